// Fused OpenELM attention for inference with a KV cache (included by kernels.cpp, inside its
// anonymous namespace, after the thread pool and the vector helpers).
//
// One primitive replaces the ~20 graph nodes between the qkv projection and out_proj: split of the
// fused projection into heads, RMSNorm of q and k over head_dim, RoPE (non-traditional: the two
// halves of a head rotate together), the cache write, causal softmax(q k^T * scale) v with grouped
// query heads (query head h reads kv head h / (H / Hkv)), and the [B, L, H * D] layout out_proj
// reads. On a 2-core CPU MLX spends more time dispatching those small nodes than computing them,
// and its CPU SDPA fallback materialises the scores of every head (15-85 ms a layer for a
// 512-token prompt); here each query row's scores live in a per-thread buffer.
//
// Three nodes: two CacheWrite (the caches k_cache/v_cache [B, Hkv, C, D] with rows [offset, offset + L)
// replaced by the new keys and values, returned for the caller to store back into its cache, an
// mlx-lm KVCache whose capacity it reserved) and CachedAttention reading them. The caches may be
// float32, float16 or bfloat16 (T below): keys and values are computed in float32, rounded to nearest
// even as they are stored, and widened as they are read; everything else is float32.

// exp(x) for 16 floats (Cephes' expf: 2^n * p(r), |relative error| < 2e-7 over the float range).
inline v16f exp16(v16f x) {
  const v16f hi = v16f{} + 88.3762626647949f, lo = v16f{} - 87.3365447504019f;
  x = x < hi ? x : hi;
  x = x > lo ? x : lo;
  v16f fx = x * 1.44269504088896341f + 0.5f;
  v16i n = __builtin_convertvector(fx, v16i);
  v16f fn = __builtin_convertvector(n, v16f);
  n = fn > fx ? n - 1 : n;  // floor
  fn = __builtin_convertvector(n, v16f);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  v16f z = x * x;
  v16f y = ((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x + 4.1665795894E-2f) * x +
            1.6666665459E-1f) * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  v16i e = (n + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

inline float hmax16(v16f v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// One row of scores p[0, lim) (lim a multiple of 16) whose first S are causal: in place exp(p - max) on
// those, 0 on the rest; returns 1 / their sum (the softmax's normaliser, applied to the weighted values).
inline float softmax_row(float* p, int64_t S, int64_t lim) {
  for (int64_t j = S; j < lim; ++j) p[j] = -INFINITY;
  v16f mv = load16(p);
  for (int64_t j = 16; j < lim; j += 16) {
    const v16f t = load16(p + j);
    mv = t > mv ? t : mv;
  }
  const float m = hmax16(mv);
  v16f sum{};
  for (int64_t j = 0; j < lim; j += 16) {
    const v16f t = load16(p + j);
    v16f e = exp16(t - m);
    e = t == -INFINITY ? v16f{} : e;
    std::memcpy(p + j, &e, sizeof(e));
    sum += e;
  }
  return 1.0f / hsum16(sum);
}

// dst[r][0, D) = inv[r] * sum_j p[r][j] * v[j] over keys j < lim (v rows of D, a multiple of 64, in the
// cache's dtype T) for the first n of four query rows: 64 output values of the four rows in 16 registers,
// each value row read once.
template <typename T>
inline void weighted_values4(const float* const p[4], int64_t lim, const T* v, int64_t D, const float* inv,
                             float* const dst[4], int64_t n) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    v16f o[4][4] = {};
    for (int64_t j = 0; j < lim; ++j) {
      const T* vj = v + j * D + d0;
      const v16f v0 = load16w(vj), v1 = load16w(vj + 16), v2 = load16w(vj + 32), v3 = load16w(vj + 48);
      for (int r = 0; r < 4; ++r) {
        const float pj = p[r][j];
        o[r][0] += pj * v0;
        o[r][1] += pj * v1;
        o[r][2] += pj * v2;
        o[r][3] += pj * v3;
      }
    }
    for (int64_t r = 0; r < n; ++r)
      for (int c = 0; c < 4; ++c) {
        const v16f x = o[r][c] * inv[r];
        std::memcpy(dst[r] + d0 + 16 * c, &x, sizeof(x));
      }
  }
}

// In place: x[D] <- RMSNorm(x) * w (w may be null: no norm), then RoPE at the given cos/sin (D/2 each).
inline void norm_rope(float* x, const float* w, float eps, const float* cs, const float* sn, int D) {
  if (w != nullptr) {
    float ss = 0.f;
    for (int d = 0; d < D; ++d) ss += x[d] * x[d];
    const float r = 1.0f / std::sqrt(ss / D + eps);
    for (int d = 0; d < D; ++d) x[d] = x[d] * r * w[d];
  }
  const int h = D / 2;
  for (int i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cs[i] - b * sn[i];
    x[i + h] = a * sn[i] + b * cs[i];
  }
}

struct AttnShape {
  int64_t B, L, H, Hkv, D, C, offset;
  float eps, scale;
  bool qk_norm;
};

#if defined(__AVX512F__)
// out lane 4r + k = the sum of v[4k + r]'s 16 lanes (a 16-way transposing reduction: 15 shuffle pairs
// and adds where 16 horizontal sums take ~8 operations each).
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // 128-bit blocks [x0+x2, x1+x3, y0+y2, y1+y3]
    a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // block i: the 4 partial lanes of v[4m + i]
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xDD));
  for (int n = 0; n < 2; ++n)  // block i: 2 lanes of v[8n + i], then 2 of v[8n + 4 + i]
    c[n] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * n], b[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * n], b[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // block i: the sums of v[i], v[4 + i], v[8 + i], v[12 + i]
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// attend_rows for one query position and head_dim a multiple of 64 (decoding): the rep query heads four
// at a time; scores of four heads x four keys reduced together (reduce16), values with the four heads'
// outputs held in 16 registers (each value row read once per four heads, no output loads/stores).
template <typename T>
inline void attend_position(const AttnShape& s, const float* q, const T* kc, const T* vc, float* out,
                            int64_t b, int64_t g, int64_t l, std::vector<float>& scratch) {
  const int64_t rep = s.H / s.Hkv, D = s.D, S = s.offset + l + 1, Sp = (S + 15) / 16 * 16;
  scratch.resize(4 * Sp);
  const T* kb = kc + (b * s.Hkv + g) * s.C * D;
  const T* vb = vc + (b * s.Hkv + g) * s.C * D;
  for (int64_t r0 = 0; r0 < rep; r0 += 4) {
    const int64_t n = std::min<int64_t>(4, rep - r0);
    const float* qr[4];
    float* orow[4];
    for (int64_t r = 0; r < 4; ++r) {
      const int64_t h = g * rep + r0 + std::min(r, n - 1);
      qr[r] = q + ((b * s.L + l) * s.H + h) * D;
      orow[r] = out + ((b * s.L + l) * s.H + h) * D;
    }
    float* sc[4] = {scratch.data(), scratch.data() + Sp, scratch.data() + 2 * Sp, scratch.data() + 3 * Sp};
    for (int64_t j0 = 0; j0 < S; j0 += 4) {
      __m512 acc[16];
      for (int k = 0; k < 4; ++k) {
        const T* kj = kb + std::min(j0 + k, S - 1) * D;  // past the end: a repeat, never read back
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 kv = ldw(kj + d);  // widened once for the four heads
          for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qr[r] + d), kv, a[r]);
        }
        for (int r = 0; r < 4; ++r) acc[4 * k + r] = a[r];
      }
      const __m512 t = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(s.scale));  // block r: keys j0..j0+3
      _mm_storeu_ps(sc[0] + j0, _mm512_extractf32x4_ps(t, 0));
      _mm_storeu_ps(sc[1] + j0, _mm512_extractf32x4_ps(t, 1));
      _mm_storeu_ps(sc[2] + j0, _mm512_extractf32x4_ps(t, 2));
      _mm_storeu_ps(sc[3] + j0, _mm512_extractf32x4_ps(t, 3));
    }
    float inv[4];
    for (int r = 0; r < 4; ++r) inv[r] = softmax_row(sc[r], S, Sp);
    weighted_values4(sc, S, vb, D, inv, orow, n);
  }
}
#endif

// Queries of kv head `g` (rep = H / Hkv of them), query row l of batch b: causal softmax over the
// keys [0, offset + l], weighted sum of the values, into out[b, l, h * D].
template <typename T>
inline void attend_rows(const AttnShape& s, const float* q, const T* kc, const T* vc, float* out, int64_t b,
                        int64_t g, int64_t l0, int64_t l1, std::vector<float>& scratch) {
  const int64_t rep = s.H / s.Hkv, D = s.D, nv = D / 16;
  const T* kb = kc + (b * s.Hkv + g) * s.C * D;
  const T* vb = vc + (b * s.Hkv + g) * s.C * D;
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t l = l0; l < l1; ++l) attend_position(s, q, kc, vc, out, b, g, l, scratch);
    return;
  }
#endif
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t S = s.offset + l + 1;  // keys this row sees
    const int64_t Sp = (S + 15) / 16 * 16;
    scratch.resize(rep * Sp);
    const float* qr = q + ((b * s.L + l) * s.H + g * rep) * D;  // rep query heads, contiguous
    // scores
    for (int64_t j = 0; j < S; ++j) {
      const T* kj = kb + j * D;
      for (int64_t r = 0; r < rep; ++r) {
        const float* qh = qr + r * D;
        v16f acc = load16(qh) * load16w(kj);
        for (int64_t c = 1; c < nv; ++c) acc += load16(qh + 16 * c) * load16w(kj + 16 * c);
        scratch[r * Sp + j] = hsum16(acc) * s.scale;
      }
    }
    float inv[64];
    float* outr = out + (b * s.L + l) * s.H * D + g * rep * D;
    for (int64_t r = 0; r < rep; ++r) {
      inv[r % 64] = softmax_row(scratch.data() + r * Sp, S, Sp);
      float* o = outr + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    }
    // values: out_r += p_r[j] * v[j]
    for (int64_t j = 0; j < S; ++j) {
      const T* vj = vb + j * D;
      for (int64_t r = 0; r < rep; ++r) {
        const float p = scratch[r * Sp + j];
        float* o = outr + r * D;
        for (int64_t c = 0; c < nv; ++c) {
          v16f ov = load16(o + 16 * c) + p * load16w(vj + 16 * c);
          std::memcpy(o + 16 * c, &ov, sizeof(ov));
        }
      }
    }
    for (int64_t r = 0; r < rep; ++r) {
      float* o = outr + r * D;
      const float iv = inv[r % 64];
      for (int64_t d = 0; d < D; ++d) o[d] *= iv;
    }
  }
}

// Query rows [l0, l1) of kv head `g` (a prompt): the same result as attend_rows, computed as two
// register-blocked products. Scores: four query rows at a time against 16 keys of K^T ([D, Sp], transposed
// once per head by the caller), 4 * D broadcast FMAs per 64 scores and no horizontal sums (attend_rows
// needs one a score: 34 GFLOP/s on a 512-token prompt, ~3x less). Values: four output rows of 64 values
// in 16 registers, each value row read once per four query rows. Rows are ordered (l, r): the rep query
// heads of a position are adjacent, so a group of four shares (nearly) one causal limit.
template <typename T>
inline void attend_block(const AttnShape& s, const float* q, const float* kt, int64_t Sp, const T* vc, float* out,
                         int64_t b, int64_t g, int64_t l0, int64_t l1, std::vector<float>& scratch) {
  const int64_t rep = s.H / s.Hkv, D = s.D, R = (l1 - l0) * rep;
  scratch.resize(R * Sp);
  float* sc = scratch.data();
  const T* vb = vc + (b * s.Hkv + g) * s.C * D;
  auto at = [&](int64_t i) { return ((b * s.L + l0 + i / rep) * s.H + g * rep + i % rep) * D; };  // row i in q/out
  auto keys = [&](int64_t i) { return s.offset + l0 + i / rep + 1; };  // keys row i sees
  for (int64_t i0 = 0; i0 < R; i0 += 4) {
    const int64_t n = std::min<int64_t>(4, R - i0), lim = (keys(i0 + n - 1) + 15) / 16 * 16;
    const float* qr[4];
    for (int64_t r = 0; r < 4; ++r) qr[r] = q + at(i0 + std::min(r, n - 1));
    for (int64_t j = 0; j < lim; j += 16) {
      v16f a0{}, a1{}, a2{}, a3{};
      for (int64_t d = 0; d < D; ++d) {
        const v16f k = load16(kt + d * Sp + j);
        a0 += qr[0][d] * k;
        a1 += qr[1][d] * k;
        a2 += qr[2][d] * k;
        a3 += qr[3][d] * k;
      }
      const v16f a[4] = {a0, a1, a2, a3};
      for (int64_t r = 0; r < n; ++r) {
        const v16f v = a[r] * s.scale;
        std::memcpy(sc + (i0 + r) * Sp + j, &v, sizeof(v));
      }
    }
    // causal softmax of each row, unnormalised: exp(s - max) on the row's keys, 0 up to the group's limit
    float inv[4];
    for (int64_t r = 0; r < n; ++r) inv[r] = softmax_row(sc + (i0 + r) * Sp, keys(i0 + r), lim);
    const float* pr[4];
    float* dst[4];
    for (int64_t r = 0; r < 4; ++r) {
      pr[r] = sc + (i0 + std::min(r, n - 1)) * Sp;
      dst[r] = out + at(i0 + std::min(r, n - 1));
    }
    weighted_values4(pr, lim, vb, D, inv, dst, n);
  }
}

std::atomic<int64_t> g_cache_copies{0};  // how often a cache had to be copied (tests: not while decoding)

struct StridedView {
  const void* p;
  int64_t st[4];
};

// dst [B, Hkv, C, D] (contiguous) <- a cache of any layout (strides, broadcasts), elements T
template <typename T>
inline void copy_rows(const StridedView& v, T* dst, const AttnShape& s) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t g = 0; g < s.Hkv; ++g)
      for (int64_t c = 0; c < s.C; ++c) {
        const T* src = static_cast<const T*>(v.p) + b * v.st[0] + g * v.st[1] + c * v.st[2];
        T* d = dst + ((b * s.Hkv + g) * s.C + c) * s.D;
        if (v.st[3] == 1)
          std::memcpy(d, src, s.D * sizeof(T));
        else
          for (int64_t i = 0; i < s.D; ++i) d[i] = src[i * v.st[3]];
      }
}

// cos/sin of theta = pos * base^(-2i/D) (as mx.fast.rope: a float32 product) for the L new positions.
inline void rope_tables(const AttnShape& s, float base, std::vector<float>& cs, std::vector<float>& sn) {
  const int64_t h = s.D / 2;
  cs.resize(s.L * h);
  sn.resize(s.L * h);
  for (int64_t i = 0; i < h; ++i) {
    const float invf = (float)std::pow((double)base, -2.0 * (double)i / (double)s.D);
    for (int64_t l = 0; l < s.L; ++l) {
      const float th = (float)(s.offset + l) * invf;
      cs[l * h + i] = std::cos(th);
      sn[l * h + i] = std::sin(th);
    }
  }
}

// The cache with rows [offset, offset + L) replaced by the new keys (first = H: RMSNorm + RoPE) or
// values (first = H + Hkv: copied). Like MLX's slice update, the input buffer is reused when nothing
// else holds it, else copied; or when the caller says it owns the cache (`owned`: the array is the one the
// last write produced for the same cache, not trimmed since). Then the only other holders are the earlier
// steps' nodes, which read rows below offset only and run first on this stream; the reference count alone
// depends on how far MLX's asynchronous evaluation has got through them (a tiny model's decoding copied its
// cache in most steps once a step had fewer graph nodes).
class CacheWrite : public mx::UnaryPrimitive {
 public:
  CacheWrite(mx::Stream st, AttnShape s, float base, bool keys, bool owned)
      : mx::UnaryPrimitive(st), s_(s), base_(base), keys_(keys), owned_(owned) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& cache = inputs[0];
    const mx::array& qkv = inputs[1];
    const mx::array& norm = inputs[2];
    const bool copy = !((owned_ || cache.is_donatable()) && cache.flags().row_contiguous && cache.data_size() == cache.size());
    if (copy) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      g_cache_copies.fetch_add(1, std::memory_order_relaxed);
    } else {
      out.copy_shared_buffer(cache);
    }
    auto& enc = encoder_for(stream(), inputs, out);
    const auto& st = cache.strides();
    std::optional<StridedView> src;
    if (copy) src = StridedView{cache.data<void>(), {st[0], st[1], st[2], st[3]}};
    with_float_type(cache.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      enc.dispatch([s = s_, base = base_, keys = keys_, xp = qkv.data<float>(), np = norm.data<float>(),
                    op = out.data<T>(), src]() {
        if (src) copy_rows(*src, op, s);
        const int64_t D = s.D, h = D / 2, W = (s.H + 2 * s.Hkv) * D, first = keys ? s.H : s.H + s.Hkv;
        std::vector<float> cs, sn, row(D);
        if (keys) rope_tables(s, base, cs, sn);
        for (int64_t b = 0; b < s.B; ++b)
          for (int64_t l = 0; l < s.L; ++l)
            for (int64_t g = 0; g < s.Hkv; ++g) {
              std::memcpy(row.data(), xp + (b * s.L + l) * W + (first + g) * D, D * sizeof(float));
              if (keys) norm_rope(row.data(), s.qk_norm ? np : nullptr, s.eps, cs.data() + l * h, sn.data() + l * h, (int)D);
              T* d = op + ((b * s.Hkv + g) * s.C + s.offset + l) * D;  // rounded to the cache's dtype here
              for (int64_t i = 0; i < D; ++i) d[i] = from_float<T>(row[i]);
            }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.cached_attention runs on the CPU only");
  }
  const char* name() const override { return "OpenELMCacheWrite"; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  AttnShape s_;
  float base_;
  bool keys_, owned_;
};

// Causal attention of the L new query rows (RMSNorm + RoPE applied here) over caches that already
// hold the new keys and values (CacheWrite's outputs).
class CachedAttention : public mx::UnaryPrimitive {
 public:
  CachedAttention(mx::Stream st, AttnShape s, float base) : mx::UnaryPrimitive(st), s_(s), base_(base) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& qkv = inputs[0];
    const mx::array& qn = inputs[1];
    const mx::array& kc = inputs[2];
    const mx::array& vc = inputs[3];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    with_float_type(kc.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      enc.dispatch([s = s_, base = base_, xp = qkv.data<float>(), qnp = qn.data<float>(), kp = kc.data<T>(),
                    vp = vc.data<T>(), op = out.data<float>()]() { attend(s, base, xp, qnp, kp, vp, op); });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.cached_attention runs on the CPU only");
  }
  const char* name() const override { return "OpenELMCachedAttention"; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>&) override {
    return {{(int)s_.B, (int)s_.L, (int)(s_.H * s_.D)}};
  }

 private:
  // q: RMSNorm + RoPE of the new query rows; then every (batch, kv head, block of query rows) on the pool
  template <typename T>
  static void attend(const AttnShape& s, float base, const float* xp, const float* qnp, const T* kp, const T* vp,
                     float* op) {
    const int64_t D = s.D, h = D / 2, W = (s.H + 2 * s.Hkv) * D;
    std::vector<float> cs, sn;
    rope_tables(s, base, cs, sn);
    std::vector<float> q(s.B * s.L * s.H * D);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t l = 0; l < s.L; ++l)
        for (int64_t hh = 0; hh < s.H; ++hh) {
          float* qd = q.data() + ((b * s.L + l) * s.H + hh) * D;
          std::memcpy(qd, xp + (b * s.L + l) * W + hh * D, D * sizeof(float));
          norm_rope(qd, s.qk_norm ? qnp : nullptr, s.eps, cs.data() + l * h, sn.data() + l * h, (int)D);
        }
    // prompts (16 rows or more, head_dim a multiple of 64): attend_block on K^T, transposed here
    const bool blocked = s.L >= 16 && D % 64 == 0;
    const int64_t Sp = (s.offset + s.L + 15) / 16 * 16;
    std::vector<float> kt(blocked ? s.B * s.Hkv * D * Sp : 0);
    if (blocked)
      pool().run(s.B * s.Hkv, [&](int64_t bg) {
        const T* src = kp + bg * s.C * D;
        float* dst = kt.data() + bg * D * Sp;
        const int64_t S = s.offset + s.L;
        for (int64_t j0 = 0; j0 < Sp; j0 += 16)
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = j0; j < j0 + 16; ++j) dst[d * Sp + j] = j < S ? to_float(src[j * D + d]) : 0.f;
      }, false);
    // work items (batch, kv head, block of query rows); later rows see more keys: those go first
    const int64_t blk = blocked ? 16 : s.L >= 64 ? 8 : 1;
    const int64_t nblk = (s.L + blk - 1) / blk, items = s.B * s.Hkv * nblk;
    std::function<void(int64_t)> job = [&](int64_t it) {
      thread_local std::vector<float> scratch;
      const int64_t i = items - 1 - it;
      const int64_t lb = i % nblk, g = (i / nblk) % s.Hkv, b = i / (nblk * s.Hkv);
      const int64_t l0 = lb * blk, l1 = std::min(s.L, (lb + 1) * blk);
      if (blocked)
        attend_block(s, q.data(), kt.data() + (b * s.Hkv + g) * D * Sp, Sp, vp, op, b, g, l0, l1, scratch);
      else
        attend_rows(s, q.data(), kp, vp, op, b, g, l0, l1, scratch);
    };
    pool().run(items, job, s.L <= 8);  // decoding (and draft checks): keep the workers spinning
  }

  AttnShape s_;
  float base_;
};

std::vector<mx::array> cached_attention(const mx::array& qkv, const std::optional<mx::array>& q_norm,
                           const std::optional<mx::array>& k_norm, const mx::array& k_cache, const mx::array& v_cache,
                           int offset, int n_heads, int n_kv_heads, float rope_base, float eps, float scale, bool owned,
                           mx::StreamOrDevice st_) {
  auto st = cpu_stream(st_);
  const mx::Dtype ct = k_cache.dtype();
  if (qkv.dtype() != mx::float32 || v_cache.dtype() != ct || (ct != mx::float32 && ct != mx::float16 && ct != mx::bfloat16))
    throw std::invalid_argument("cached_attention: qkv must be float32 and both caches float32, float16 or bfloat16");
  if (qkv.ndim() != 3 || k_cache.ndim() != 4 || v_cache.shape() != k_cache.shape())
    throw std::invalid_argument("cached_attention: qkv must be [B, L, W] and the caches [B, Hkv, C, D]");
  if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || n_heads / n_kv_heads > 64)
    throw std::invalid_argument("cached_attention: n_heads must be a multiple of n_kv_heads (at most 64 times)");
  const int B = qkv.shape(0), L = qkv.shape(1), D = k_cache.shape(3), C = k_cache.shape(2);
  if (D % 16 != 0) throw std::invalid_argument("cached_attention: head_dim must be a multiple of 16");
  if (k_cache.shape(0) != B || k_cache.shape(1) != n_kv_heads || qkv.shape(2) != (n_heads + 2 * n_kv_heads) * D)
    throw std::invalid_argument("cached_attention: shapes of qkv and the caches do not match");
  if (offset < 0 || offset + L > C) throw std::invalid_argument("cached_attention: the cache has no room for L rows");
  const bool norm = q_norm.has_value();
  if (norm != k_norm.has_value()) throw std::invalid_argument("cached_attention: give both q_norm and k_norm or neither");
  AttnShape s{B, L, n_heads, n_kv_heads, D, C, offset, eps, scale, norm};
  auto c = [&](const mx::array& a) { return row_contiguous(a, st); };
  mx::array qn = norm ? mx::astype(c(*q_norm), mx::float32, st) : mx::zeros({D}, mx::float32, st);
  mx::array kn = norm ? mx::astype(c(*k_norm), mx::float32, st) : qn;  // no norm: the same unused zeros
  if (qn.size() != (size_t)D || kn.size() != (size_t)D)
    throw std::invalid_argument("cached_attention: q_norm and k_norm must have head_dim values");
  mx::array x = c(qkv);
  mx::array k2(k_cache.shape(), ct, std::make_shared<CacheWrite>(st, s, rope_base, true, owned), {k_cache, x, kn});
  mx::array v2(v_cache.shape(), ct, std::make_shared<CacheWrite>(st, s, rope_base, false, owned), {v_cache, x, kn});
  mx::array out({B, L, n_heads * D}, mx::float32, std::make_shared<CachedAttention>(st, s, rope_base), {x, qn, k2, v2});
  return {out, k2, v2};
}
