// Prompt products of half and 4/8-bit weights with float32 inputs by this extension's own AVX-512 FMA
// micro-kernel (included by kernels.cpp, inside its anonymous namespace, after bf16_gemm.h): the bf16_gemm.h
// layout with float32 values. W is widened a panel of kFPanel = 32 rows at a time straight into the layout the
// micro-kernel reads (P[k, j] = w[n + j, k]), by the thread that uses it (K * 128 bytes: in L2), and x is read
// as it is: against widened tiles into cblas_sgemm this drops the tile copy, sgemm's packing of that copy,
// and its packing of x once per tile. Every product is exact in float32 and summed in order over k.

#if defined(__AVX512F__)
#define MLX_OPENELM_F32PANEL 1

constexpr int kFPanel = 32;
constexpr int kFMR = 6;

// P [K, 32]: rows [n, n + rows) of W widened, the other columns zero; tmp: rows * K floats
inline void pack_panel_f32(mx::Dtype wt, const void* w, const Affine& qa, int bits, int gs, int64_t K, int64_t N,
                           int64_t n, float* P, float* tmp) {
  const int rows = (int)std::max<int64_t>(0, std::min<int64_t>(kFPanel, N - n));
  widen_rows(wt, w, qa, bits, gs, K, n, n + rows, tmp);
  if (rows < kFPanel) std::memset(P, 0, K * kFPanel * sizeof(float));
  // 16 x 16 blocks: row j's values k0..k0+16 become column j of rows k0..k0+16
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, K - k0);
    for (int j = 0; j < rows; ++j) {
      const float* src = tmp + j * K + k0;
      float* dst = P + k0 * kFPanel + j;
      for (int64_t k = 0; k < kn; ++k) dst[k * kFPanel] = src[k];
    }
  }
}

// c[r, 0:32) for MR rows of x (ldx floats a row) against one panel; columns past `valid` are not stored.
template <int MR>
void f32_micro(const float* x, int64_t ldx, const float* P, int64_t K, float* c, int64_t ldc, int valid) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(P + k * kFPanel), b1 = _mm512_loadu_ps(P + k * kFPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = valid >= 16 ? 0xffff : (__mmask16)((1u << valid) - 1);
  const __mmask16 m1 = valid >= 32 ? 0xffff : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
  }
}

inline void f32_rows(const float* x, int64_t M, int64_t K, const float* P, float* c, int64_t ldc, int valid) {
  int64_t m = 0;
  for (; m + kFMR <= M; m += kFMR) f32_micro<kFMR>(x + m * K, K, P, K, c + m * ldc, ldc, valid);
  const float* xr = x + m * K;
  float* cr = c + m * ldc;
  switch (M - m) {
    case 5: f32_micro<5>(xr, K, P, K, cr, ldc, valid); break;
    case 4: f32_micro<4>(xr, K, P, K, cr, ldc, valid); break;
    case 3: f32_micro<3>(xr, K, P, K, cr, ldc, valid); break;
    case 2: f32_micro<2>(xr, K, P, K, cr, ldc, valid); break;
    case 1: f32_micro<1>(xr, K, P, K, cr, ldc, valid); break;
    default: break;
  }
}

// c[m, j] (row stride ldc) = x row m times W row n0 + j, j in [0, n1 - n0): one panel a chunk on the pool.
inline void f32_panel_product(const float* x, int64_t M, int64_t K, mx::Dtype wt, const void* w, const Affine& qa,
                              int bits, int gs, int64_t n0, int64_t n1, float* c, int64_t ldc) {
  const int64_t panels = (n1 - n0 + kFPanel - 1) / kFPanel;
  std::function<void(int64_t)> job = [&](int64_t i) {
    thread_local std::vector<float> P, tmp;
    P.resize(K * kFPanel);
    tmp.resize(K * kFPanel);
    const int64_t n = n0 + i * kFPanel;
    pack_panel_f32(wt, w, qa, bits, gs, K, n1, n, P.data(), tmp.data());
    f32_rows(x, M, K, P.data(), c + (n - n0), ldc, (int)std::min<int64_t>(kFPanel, n1 - n));
  };
  pool().run(panels, job, false);
}

#endif  // AVX-512F
