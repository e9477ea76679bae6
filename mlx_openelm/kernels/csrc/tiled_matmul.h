// Many-row products with weights the CPU BLAS cannot read directly (included by kernels.cpp, inside
// its anonymous namespace): x[M, K] @ W^T with W bfloat16/float16 or 4/8-bit affine. W is widened to
// float32 a tile of rows at a time (kTileBytes: it stays in the L3 cache) and each tile goes to the process's
// cblas_sgemm (found with dlsym: the OpenBLAS mlx_openelm preloads globally, else whatever BLAS MLX
// itself resolved), writing its columns of the output. With OpenBLAS and more than one thread the tiles are
// shared out over the extension's pool, one single-threaded sgemm each (widened_tiles). Where the CPU has
// AVX-512 half and 4/8-bit weights take f32_panel.h's own kernel instead (panels of 32 rows widened straight
// into the layout it reads; no copy for sgemm to pack again). Against dequantizing whole layers first this
// holds no float32 copy of a layer (the transient that made a 4-bit model's prompt peak at twice its
// size) and reads each widened tile from cache. With bf16_inputs (the bfloat16 prompt precision) bfloat16
// and 4/8-bit weights go to bf16_gemm.h's bfloat16 dot products instead, where the CPU has them.

#include <dlfcn.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);

inline sgemm_fn blas_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

// OpenBLAS's thread count, where the process's BLAS is OpenBLAS (else both null): the tiles below run on our
// pool, one single-threaded sgemm per thread, with OpenBLAS's own threads set to one meanwhile.
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)();
inline set_threads_fn blas_set_threads() {
  static set_threads_fn fn = reinterpret_cast<set_threads_fn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  return fn;
}
inline get_threads_fn blas_get_threads() {
  static get_threads_fn fn = reinterpret_cast<get_threads_fn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return fn;
}

// Tests and benchmarks switch the pooled tiles off (the BLAS's own threads then split every tile).
std::atomic<bool> g_pooled_tiles{[] {
  const char* s = std::getenv("MLX_OPENELM_POOLED_TILES");
  return !(s && s[0] == '0');
}()};

// OpenBLAS single-threaded for this scope (restored after). Its thread count is a process-wide setting: an
// sgemm on another MLX stream meanwhile would run single-threaded too (correct, slower).
class BlasOneThread {
 public:
  BlasOneThread() : prev_(blas_get_threads()()) {
    if (prev_ != 1) blas_set_threads()(1);
  }
  ~BlasOneThread() {
    if (prev_ != 1) blas_set_threads()(prev_);
  }

 private:
  int prev_;
};

// W as float32 by this extension's own multi-threaded primitives (MLX's CPU astype/dequantize are
// 0.4 G / 15 M values/s): for the gradient with respect to x when training on a half or quantized base.
mx::array widened(const std::vector<mx::array>& p, int bits, int gs, mx::Stream st) {
  const mx::array& w = p[1];
  if (bits)
    return mx::array({w.shape(0), (int)((int64_t)w.shape(1) * 32 / bits)}, mx::float32,
                     std::make_shared<Dequant>(st, gs, bits), {w, p[2], p[3]});
  return mx::array(w.shape(), mx::float32, std::make_shared<ToFloat>(st), {w});
}

// Float32 bytes of W widened per cblas_sgemm call. Each call packs x again (M x K floats), so tiles
// too small for the M of a prompt spend their time there: a 511-token prompt of a float16 270M model
// prefilled at 119 / 253 / 291 / 273 tok/s (medians, interleaved) with 0.5 / 2 / 8 / 16 MB tiles.
// The tiles come from MLX's allocator (Scratch), so its peak-memory figures count them.
constexpr int64_t kTileBytes = int64_t(8) << 20;

// Scratch floats from MLX's allocator (so its active/peak memory figures count them), freed with it.
class Scratch {
 public:
  explicit Scratch(size_t n) : data_(mx::allocator::malloc(n * sizeof(float))) {}
  float* data() {
    mx::allocator::Buffer b = data_.buffer();
    return static_cast<float*>(b.raw_ptr());
  }

 private:
  mx::allocator::Data data_;
};

// o[j] = silu(g[j]) * u[j] = g / (1 + exp(-g)) * u, 16 at a time (exp16: relative error < 2e-7; libm's expf
// one value at a time was ~1.2% of a float16 prefill)
inline void silu_mul(const float* g, const float* u, float* o, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16f a = load16(g + j);
    const v16f r = a / (1.0f + exp16(-a)) * load16(u + j);
    std::memcpy(o + j, &r, sizeof(r));
  }
  for (; j < n; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
}

// x [M, K] @ W^T a tile of W's rows at a time, each widened to float32 (float32 W: read in place) and given to one
// cblas_sgemm (SwiGLU: a tile of hidden units, its gate and up rows side by side, then silu(g) * u into
// op [M, N / 2], so the [M, N] projection output is never held whole). `pooled`: the tiles are claimed by the
// pool's threads, each widening into its own buffer and running a single-threaded sgemm, else they run in turn
// on the BLAS's own threads. Pooled, this also widens on every core and leaves no OpenBLAS thread spinning beside
// ours (involuntary context switches per 512-token prefill: 170-1362 -> 70-194). 512-token prefill of a 270M
// model, medians of 8-10 interleaved rounds in one process: float16 311.1 -> 326.5 tok/s (paired 1.049), 4-bit
// with float32 prompt precision 317.3 -> 339.0 (1.072), float32 (its SwiGLU products) 283.7 -> 295.8 (1.055).
// Shares of 1 / 2 / 4 / 8 MB a thread: 301 / 315 / 329 / 312 tok/s (float16, alternating processes).
inline void widened_tiles(const float* xf, int64_t M, int64_t K, int64_t N, mx::Dtype wt, const void* wp,
                          const Affine& qa, int bits, int gs, bool swiglu, float* op, bool pooled) {
  Pool& p = pool();
  const int nt = pooled ? p.size() : 1;
  const int64_t cols = swiglu ? N / 2 : N, per = swiglu ? 2 : 1;  // output columns; W rows per column
  const bool in_place = !bits && !swiglu && wt == mx::float32;
  // a multiple of nt tiles (even shares), each at most kTileBytes / nt of float32 weights (float32 W on the
  // BLAS's threads: one sgemm on all of it)
  const int64_t share = std::max<int64_t>(1, kTileBytes / nt);
  int64_t tiles = in_place && !pooled ? 1 : std::max<int64_t>(1, (cols * per * K * 4 + share - 1) / share);
  tiles = (tiles + nt - 1) / nt * nt;
  const int64_t T = ((cols + tiles - 1) / tiles + 15) / 16 * 16;
  tiles = (cols + T - 1) / T;
  std::vector<std::unique_ptr<Scratch>> buf(nt), tmp(nt);
  for (int t = 0; t < (in_place ? 0 : std::min<int64_t>(nt, tiles)); ++t) {
    buf[t] = std::make_unique<Scratch>(per * T * K);
    if (swiglu) tmp[t] = std::make_unique<Scratch>(M * 2 * T);
  }
  auto tile = [&](int64_t c, int t) {
    const int64_t h0 = c * T, h1 = std::min(cols, h0 + T), n = h1 - h0;
    if (in_place) {  // float32 W: its rows as they are
      blas_sgemm()(kRowMajor, kNoTrans, kTrans, (int)M, (int)n, (int)K, 1.0f, xf, (int)K,
                   static_cast<const float*>(wp) + h0 * K, (int)K, 0.0f, op + h0, (int)N);
      return;
    }
    float* b = buf[t]->data();
    widen_rows(wt, wp, qa, bits, gs, K, h0, h1, b);
    if (!swiglu) {
      blas_sgemm()(kRowMajor, kNoTrans, kTrans, (int)M, (int)n, (int)K, 1.0f, xf, (int)K, b, (int)K, 0.0f, op + h0,
                   (int)N);
      return;
    }
    widen_rows(wt, wp, qa, bits, gs, K, cols + h0, cols + h1, b + n * K);
    float* g = tmp[t]->data();
    blas_sgemm()(kRowMajor, kNoTrans, kTrans, (int)M, (int)(2 * n), (int)K, 1.0f, xf, (int)K, b, (int)K, 0.0f, g,
                 (int)(2 * n));
    for (int64_t m = 0; m < M; ++m) silu_mul(g + m * 2 * n, g + m * 2 * n + n, op + m * cols + h0, n);
  };
  if (!pooled) {
    for (int64_t c = 0; c < tiles; ++c) tile(c, 0);
    return;
  }
  BlasOneThread one;
  p.run_indexed(tiles, tile, false);
}

inline bool pooled_tiles_apply() {
  return blas_set_threads() && blas_get_threads() && pool().size() > 1 &&
         g_pooled_tiles.load(std::memory_order_relaxed);
}

// Tests switch the panel kernel off (then: pooled tiles into sgemm); MLX_OPENELM_F32_PANEL=0 at start-up too.
std::atomic<bool> g_f32_panel{[] {
  const char* s = std::getenv("MLX_OPENELM_F32_PANEL");
  return !(s && s[0] == '0');
}()};

bool set_f32_panel(bool on) { return g_f32_panel.exchange(on); }

#ifdef MLX_OPENELM_F32PANEL
// Half and 4/8-bit weights with float32 inputs (float32 weights: sgemm reads them in place, nothing to widen).
// 512-token prefill, alternating processes (4 + 4 rounds): float16 306.2 -> 341.6 and 335.4 -> 350.7 tok/s,
// 4-bit with float32 prompt precision 326.6 -> 352.5.
inline bool f32panel_applies(mx::Dtype wt) {
  return wt != mx::float32 && g_f32_panel.load(std::memory_order_relaxed);
}
inline bool has_f32_panel() { return true; }
#else
inline bool f32panel_applies(mx::Dtype) { return false; }
inline bool has_f32_panel() { return false; }
inline void f32_panel_product(const float*, int64_t, int64_t, mx::Dtype, const void*, const Affine&, int, int, int64_t,
                              int64_t, float*, int64_t) {}
#endif

// Tests turn the dot path off to check the path of CPUs without AVX-512 BF16 (read as a product is built).
std::atomic<bool> g_bf16_dot{true};

class TiledMatmul : public mx::UnaryPrimitive {
 public:
  // bf16: x rounded to bfloat16; dot: by bfloat16 dot products where they apply (else the float32 path)
  TiledMatmul(mx::Stream s, int bits, int gs, bool swiglu, bool bf16, bool dot)
      : mx::UnaryPrimitive(s), bits_(bits), gs_(gs), swiglu_(swiglu), bf16_(bf16), dot_(dot) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t N = w.shape(0), K = bits_ ? w.shape(1) * 32 / bits_ : w.shape(1), M = x.size() / K;
    const Affine qa = affine_of(inputs, 2, bits_);
    enc.dispatch([=, xp = x.data<float>(), wp = w.data<void>(), wt = w.dtype(), op = out.data<float>(), bits = bits_,
                  gs = gs_, swiglu = swiglu_, bf16 = bf16_, use_dot = dot_]() {
      if (M == 0) return;
      // bfloat16 prompt precision (bf16_gemm.h): bfloat16 and 4/8-bit weights only
      const bool round = bf16 && (bits || wt == mx::bfloat16);
      const float* xf = xp;
      std::optional<Scratch> xr, a, xs;
      const bool dot = round && use_dot && bf16dot_applies(wt, bits, K);  // false where not built
      if (dot) {
        a.emplace(M * K / 2);  // bfloat16 pairs: 4 bytes, like a float
        if (bits) xs.emplace(M * (K / gs));
        pack_x_bf16(xp, M, K, gs, reinterpret_cast<uint32_t*>(a->data()), bits ? xs->data() : nullptr);
      } else {
        if (round) {
          xr.emplace(M * K);
          round_to_bf16(xp, M * K, xr->data());
          xf = xr->data();
        }
        if (!f32panel_applies(wt)) {
          widened_tiles(xf, M, K, N, wt, wp, qa, bits, gs, swiglu, op, pooled_tiles_apply());
          return;
        }
      }
      // the kernels of bf16_gemm.h (dot) or f32_panel.h: dst[m, j] (row stride ldc) = x row m times W row n0 + j,
      // j in [0, n1 - n0), one panel of W a chunk on the pool
      auto rows = [&](int64_t n0, int64_t n1, float* dst, int64_t ldc) {
        if (dot)
          bf16_product(reinterpret_cast<const uint32_t*>(a->data()), bits ? xs->data() : nullptr, M, K, wt, wp, qa,
                       bits, gs, n0, n1, dst, ldc);
        else
          f32_panel_product(xf, M, K, wt, wp, qa, bits, gs, n0, n1, dst, ldc);
      };
      if (!swiglu) {
        rows(0, N, op, N);
        return;
      }
      const int64_t H = N / 2;  // a tile of T hidden units at a time (gate and up products side by side in tmp)
      const int64_t T = std::max<int64_t>(16, std::min<int64_t>(H, kTileBytes / 2 / (K * 4)) / 16 * 16);
      Scratch tmp(M * 2 * T);
      for (int64_t h0 = 0; h0 < H; h0 += T) {
        const int64_t h1 = std::min(H, h0 + T), t = h1 - h0;
        rows(h0, h1, tmp.data(), 2 * t);
        rows(H + h0, H + h1, tmp.data() + t, 2 * t);
        for (int64_t m = 0; m < M; ++m) silu_mul(tmp.data() + m * 2 * t, tmp.data() + m * 2 * t + t, op + m * H + h0, t);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.tiled_matmul runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    // d/dx = cotangent @ W (half or 4/8-bit W widened by this extension); d/dW = cotangent^T @ x for a
    // float32 W only (half and quantized weights are frozen bases)
    if (swiglu_) throw std::invalid_argument("tiled_swiglu: inference only (no gradient)");
    const mx::array& x = primals[0];
    const mx::array& w = primals[1];
    const bool f32 = !bits_ && w.dtype() == mx::float32;
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {
        grads.push_back(mx::matmul(cotangents[0], f32 ? w : widened(primals, bits_, gs_, stream()), stream()));
      } else if (a == 1 && f32) {
        const int N = w.shape(0), K = w.shape(1);
        mx::array c2 = mx::reshape(cotangents[0], {-1, N}, stream());
        grads.push_back(mx::matmul(mx::transpose(c2, stream()), mx::reshape(x, {-1, K}, stream()), stream()));
      } else {
        throw std::invalid_argument("tiled_matmul: no gradient with respect to half or 4/8-bit weights");
      }
    }
    return grads;
  }
  const char* name() const override { return "OpenELMTiledMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const TiledMatmul&>(other);
    return bits_ == o.bits_ && gs_ == o.gs_ && swiglu_ == o.swiglu_ && bf16_ == o.bf16_ && dot_ == o.dot_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {out_shape(inputs[0], inputs[1].shape(0) / (swiglu_ ? 2 : 1))};
  }

 private:
  int bits_, gs_;
  bool swiglu_, bf16_, dot_;
};

bool has_blas() { return blas_sgemm() != nullptr; }

bool set_bf16_dot(bool on) { return g_bf16_dot.exchange(on); }

bool set_pooled_tiles(bool on) { return g_pooled_tiles.exchange(on); }

bool has_bf16_dot() {
#ifdef MLX_OPENELM_BF16DOT
  return true;
#else
  return false;
#endif
}

mx::array tiled(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                const std::optional<mx::array>& biases, int group_size, int bits, bool swiglu, bool bf16_inputs, mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  if (!has_blas()) throw std::runtime_error("tiled products: no cblas_sgemm in the process");
  if (x.dtype() != mx::float32 || w.ndim() != 2 || (swiglu && w.shape(0) % 2))
    throw std::invalid_argument("tiled products: x float32, w 2-D (SwiGLU: an even number of rows [gate; up])");
  const int64_t K = bits ? (int64_t)w.shape(1) * 32 / bits : w.shape(1);
  if (x.ndim() < 1 || x.shape(-1) != K) throw std::invalid_argument("tiled products: x's last axis must match w's K");
  auto c = [&](const mx::array& a) { return row_contiguous(a, st); };
  std::vector<mx::array> in{c(x), c(w)};
  if (bits) {
    if ((bits != 4 && bits != 8) || !scales || !biases || !affine_fits(w, *scales, *biases, K, group_size))
      throw std::invalid_argument("tiled products: 4/8-bit w needs uint32 w and scales/biases of its groups "
                                  "(float32, float16 or bfloat16 alike)");
    in.push_back(c(*scales));
    in.push_back(c(*biases));
  } else if (w.dtype() != mx::bfloat16 && w.dtype() != mx::float16 && w.dtype() != mx::float32) {
    throw std::invalid_argument("tiled products: w must be float32, bfloat16 or float16 (or 4/8-bit)");
  }
  return mx::array(out_shape(x, w.shape(0) / (swiglu ? 2 : 1)), mx::float32,
                   std::make_shared<TiledMatmul>(st, bits, group_size, swiglu, bf16_inputs,
                                                 g_bf16_dot.load(std::memory_order_relaxed)), std::move(in));
}

mx::array tiled_matmul(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                       const std::optional<mx::array>& biases, int group_size, int bits, bool bf16_inputs, mx::StreamOrDevice s) {
  return tiled(x, w, scales, biases, group_size, bits, false, bf16_inputs, s);
}

mx::array tiled_swiglu(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                       const std::optional<mx::array>& biases, int group_size, int bits, bool bf16_inputs, mx::StreamOrDevice s) {
  return tiled(x, w, scales, biases, group_size, bits, true, bf16_inputs, s);
}
