// Prompt products with bfloat16 inputs (included by kernels.cpp, inside its anonymous namespace): the
// "bfloat16 prompt precision" of tiled_matmul / tiled_swiglu, for bfloat16 and 4/8-bit weights.
//
// x is rounded to bfloat16 (to nearest even), the weights are used exactly as stored, and every
// product is summed in float32: out[m, n] = sum_k bf16(x[m, k]) * w[n, k]. That is what a bfloat16
// model computes on a GPU (and llama.cpp's BF16 rows on a CPU), without the rounding of the output.
// Where the CPU has AVX-512 BF16 one `vdpbf16ps` does 32 multiply-adds (16 lanes of two bfloat16
// products each, exact in float32, added in float32): twice the float32 FMA rate, so a prompt no longer
// waits on sgemm. A 4/8-bit weight enters as its integer q (0..255 is exact in bfloat16) and the affine
// map is applied per group,
//
//   sum_k x_k (s_g q_k + b_g) = s_g * sum_{k in g} x_k q_k + b_g * sum_{k in g} x_k,
//
// with the group's partial dot in its own float32 accumulator. Without AVX-512 BF16 the same
// rounding of x is applied and the float32 path (widened tiles, cblas_sgemm) does the rest.
//
// Layout: x as bfloat16 pairs, a[m, p] = (x[m, 2p], x[m, 2p + 1]) in one 32-bit word; W a panel of
// kPanel = 32 output columns at a time, P[p, j] = (w[n + j, 2p], w[n + j, 2p + 1]), packed by the
// thread that uses it (K * 64 bytes: in L2) and read once per kMR = 6 rows of x. A micro-kernel holds
// 6 x 32 outputs in 12 registers (plus 12 for a group's partial sums).

// x rounded to bfloat16, kept as float32 (the path without AVX-512 BF16)
inline void round_to_bf16(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(bf16_t{(uint16_t)bf16_bits(x[i])});
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define MLX_OPENELM_BF16DOT 1

constexpr int kPanel = 32;
constexpr int kMR = 6;

// Whether the bfloat16 dot path takes this product (else: rounded x, float32 path).
inline bool bf16dot_applies(mx::Dtype wt, int bits, int64_t K) {
  return K % 32 == 0 && (bits == 4 || bits == 8 || (bits == 0 && wt == mx::bfloat16));
}

// x [M, K] -> a [M, K / 2] (bfloat16 pairs, to nearest even); grouped: xs[m, g] = sum of the rounded x
// over group g (the biases' part), summed in float32 like the float path's group_sums.
inline void pack_x_bf16(const float* x, int64_t M, int64_t K, int gs, uint32_t* a, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint32_t* ar = a + m * (K / 2);
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + k + 16), _mm512_loadu_ps(xr + k));
      _mm512_storeu_si512(ar + k / 2, (__m512i)v);
    }
    if (xs) {
      const bf16_t* h = reinterpret_cast<const bf16_t*>(ar);
      for (int64_t g = 0; g < K / gs; ++g) {
        float s = 0.f;
        for (int j = 0; j < gs; ++j) s += to_float(h[g * gs + j]);
        xs[m * (K / gs) + g] = s;
      }
    }
  }
}

// bfloat16 bits of the integers 0..255 (exact: at most 8 significant bits)
struct IntBf16 {
  uint16_t v[256];
  uint32_t nib[256];  // a byte's two nibbles: low -> low half, high -> high half
  IntBf16() {
    for (int i = 0; i < 256; ++i) v[i] = (uint16_t)bf16_bits((float)i);
    for (int i = 0; i < 256; ++i) nib[i] = v[i & 15] | ((uint32_t)v[i >> 4] << 16);
  }
};

// Panel of rows [n, n + 32) of W (rows past N are zero): P[p, j] as above; grouped also S[g, j], B[g, j].
// P is written in order, reading the 32 rows side by side (32 sequential streams).
inline void pack_panel(mx::Dtype wt, const void* w, const Affine& qa, int bits, int gs, int64_t K, int64_t N,
                       int64_t n, uint32_t* P, float* S, float* B) {
  static const IntBf16 t;
  const int64_t KP = K / 2, G = bits ? K / gs : 0;
  const int rows = (int)std::max<int64_t>(0, std::min<int64_t>(kPanel, N - n));
  if (rows < kPanel) std::memset(P, 0, KP * kPanel * sizeof(uint32_t));
  const uint8_t* base = static_cast<const uint8_t*>(w);
  const int64_t row_bytes = bits ? K * bits / 8 : K * 2;
  const uint8_t* q[kPanel];
  for (int j = 0; j < rows; ++j) q[j] = base + (n + j) * row_bytes;
  for (int64_t p = 0; p < KP; ++p) {
    uint32_t* o = P + p * kPanel;
    if (bits == 4)
      for (int j = 0; j < rows; ++j) o[j] = t.nib[q[j][p]];
    else if (bits == 8)
      for (int j = 0; j < rows; ++j) o[j] = t.v[q[j][2 * p]] | ((uint32_t)t.v[q[j][2 * p + 1]] << 16);
    else
      for (int j = 0; j < rows; ++j) std::memcpy(o + j, q[j] + 4 * p, 4);
  }
  if (!G) return;
  with_affine(qa, [&](const auto* sc, const auto* bi) {
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < kPanel; ++j) {
        S[g * kPanel + j] = j < rows ? to_float(sc[(n + j) * G + g]) : 0.f;
        B[g * kPanel + j] = j < rows ? to_float(bi[(n + j) * G + g]) : 0.f;
      }
  });
}

inline __m512 dot_pair(__m512 acc, uint32_t a, const uint32_t* p) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)_mm512_loadu_si512(p));
}

// c[r, 0:32) for MR rows of a (lda words a row) against one panel; GROUPED: gp pairs a group, per group
// acc += S[g] * partial + B[g] * xs[r, g]. Columns past `valid` are not stored.
template <int MR, bool GROUPED>
void bf16_micro(const uint32_t* a, int64_t lda, const float* xs, int64_t G, const uint32_t* P, const float* S,
                const float* B, int64_t KP, int64_t gp, float* c, int64_t ldc, int valid) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  auto span = [&](__m512 (&t)[MR][2], int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(P + p * kPanel);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(P + p * kPanel + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r * lda + p]);
        t[r][0] = _mm512_dpbf16_ps(t[r][0], x, b0);
        t[r][1] = _mm512_dpbf16_ps(t[r][1], x, b1);
      }
    }
  };
  if (!GROUPED) {
    span(acc, 0, KP);
  } else {
    for (int64_t g = 0; g < G; ++g) {
      __m512 t[MR][2];
      for (int r = 0; r < MR; ++r) t[r][0] = t[r][1] = _mm512_setzero_ps();
      span(t, g * gp, (g + 1) * gp);
      const __m512 s0 = _mm512_loadu_ps(S + g * kPanel), s1 = _mm512_loadu_ps(S + g * kPanel + 16);
      const __m512 b0 = _mm512_loadu_ps(B + g * kPanel), b1 = _mm512_loadu_ps(B + g * kPanel + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 xg = _mm512_set1_ps(xs[r * G + g]);
        acc[r][0] = _mm512_fmadd_ps(xg, b0, _mm512_fmadd_ps(t[r][0], s0, acc[r][0]));
        acc[r][1] = _mm512_fmadd_ps(xg, b1, _mm512_fmadd_ps(t[r][1], s1, acc[r][1]));
      }
    }
  }
  const __mmask16 m0 = valid >= 16 ? 0xffff : (__mmask16)((1u << valid) - 1);
  const __mmask16 m1 = valid >= 32 ? 0xffff : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
  }
}

template <bool GROUPED>
void bf16_rows(const uint32_t* a, const float* xs, int64_t M, int64_t K, int64_t G, const uint32_t* P, const float* S,
               const float* B, int64_t gp, float* c, int64_t ldc, int valid) {
  const int64_t KP = K / 2;
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    bf16_micro<kMR, GROUPED>(a + m * KP, KP, xs + m * G, G, P, S, B, KP, gp, c + m * ldc, ldc, valid);
  const float* xr = xs + m * G;
  const uint32_t* ar = a + m * KP;
  float* cr = c + m * ldc;
  switch (M - m) {
    case 5: bf16_micro<5, GROUPED>(ar, KP, xr, G, P, S, B, KP, gp, cr, ldc, valid); break;
    case 4: bf16_micro<4, GROUPED>(ar, KP, xr, G, P, S, B, KP, gp, cr, ldc, valid); break;
    case 3: bf16_micro<3, GROUPED>(ar, KP, xr, G, P, S, B, KP, gp, cr, ldc, valid); break;
    case 2: bf16_micro<2, GROUPED>(ar, KP, xr, G, P, S, B, KP, gp, cr, ldc, valid); break;
    case 1: bf16_micro<1, GROUPED>(ar, KP, xr, G, P, S, B, KP, gp, cr, ldc, valid); break;
    default: break;
  }
}

// c[m, j] (row stride ldc) = packed x row m times W row n0 + j, for j in [0, n1 - n0): one panel a chunk
// on the pool (the packing thread uses its panel at once, from L2).
inline void bf16_product(const uint32_t* a, const float* xs, int64_t M, int64_t K, mx::Dtype wt, const void* w,
                         const Affine& qa, int bits, int gs, int64_t n0, int64_t n1, float* c, int64_t ldc) {
  const int64_t G = bits ? K / gs : 0, gp = bits ? gs / 2 : 0;
  const int64_t panels = (n1 - n0 + kPanel - 1) / kPanel;
  std::function<void(int64_t)> job = [&](int64_t i) {
    thread_local std::vector<uint32_t> P;
    thread_local std::vector<float> SB;
    P.resize(K / 2 * kPanel);
    SB.resize(2 * G * kPanel);
    const int64_t n = n0 + i * kPanel;
    pack_panel(wt, w, qa, bits, gs, K, n1, n, P.data(), SB.data(), SB.data() + G * kPanel);
    const int valid = (int)std::min<int64_t>(kPanel, n1 - n);
    if (bits)
      bf16_rows<true>(a, xs, M, K, G, P.data(), SB.data(), SB.data() + G * kPanel, gp, c + (n - n0), ldc, valid);
    else
      bf16_rows<false>(a, xs, M, K, 0, P.data(), nullptr, nullptr, 0, c + (n - n0), ldc, valid);
  };
  pool().run(panels, job, false);
}

#else  // no AVX-512 BF16: the dot path never applies (the callers then round x and take the float32 path)

inline bool bf16dot_applies(mx::Dtype, int, int64_t) { return false; }
inline void pack_x_bf16(const float*, int64_t, int64_t, int, uint32_t*, float*) {}
inline void bf16_product(const uint32_t*, const float*, int64_t, int64_t, mx::Dtype, const void*, const Affine&, int,
                         int, int64_t, int64_t, float*, int64_t) {}

#endif  // AVX-512 BF16
