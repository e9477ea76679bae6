// One row of x times 4-bit affine weights with integer dot products (AVX-512 VNNI), still
// float32-accurate (included by kernels.cpp, inside its anonymous namespace).
//
// The float path (qgemv_one) spends per 32 weights two conversions to float and two FMAs; here x is
// written, per group of gs values, exactly enough as three int8 parts in block floating point,
//
//   x = sx * (x0 + x1 / 256 + x2 / 65536),   sx = 2^e > max|x_g| / 126,   x0, x1, x2 in [-128, 127],
//
// (the remainder after x2 is at most sx / 2^16 < 2^-22 of the group's largest value, about the
// rounding of a float32 sum of those values), and sum_k q_k x_k is three exact int32 dot products
// (vpdpbusd: 64 u8 x s8 products an instruction), combined per 32-bit lane as ((d0 << 8) + d1 << 8) + d2
// (a lane holds 8 weights of one group: |value| < 2^30); only its conversion to float rounds. The
// bias part, sum_g b_g * sum(x_g), is the float path's. 8-bit weights stay on the float path: with
// 4 weights of up to 255 a lane the parts need two accumulators, and measured it was no faster.
//
// A "chunk" is 64 bytes of a weight row: 128 weights (byte b: weight 2b in the low nibble, 2b + 1 in
// the high one); lane j of a chunk holds weights [8j, 8j + 8). Each thread reads its rows as two
// sequential streams (the two halves of its rows, a row of each at a time) and prefetches 2 KB ahead
// (measured: 14-16.5 -> 20-21 G weights/s on one core from memory; the hardware prefetcher alone leaves
// the loads waiting).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MLX_OPENELM_VNNI 1

// x's int8 parts, per chunk and part (x0, x1, x2): 64 bytes for the low nibbles (even weights), then 64
// for the high ones. lane_scale[c * 16 + j] = sx / 65536 of the group lane j of chunk c falls in.
struct VnniX {
  std::vector<int8_t> parts;
  std::vector<float> lane_scale;
};

// 16 floats r (|r| < 126) -> d0 = round(r), then the next two base-256 digits of the remainder. Every
// step is exact in float32 (r - d0 is a multiple of r's ulp below 1/2; times 256 is a power of two).
// The remainder times 256 lies in [-128, 128]: where its digit would be 128, d0 takes one more and
// the digit is -128 (d0 has room: |d0| <= 126). The last digit rounds (|error| <= 1/2, or 1 where
// 128 is clamped to 127).
inline void split3(__m512 r, int8_t* p0, int8_t* p1, int8_t* p2) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 b = _mm512_set1_ps(256.f), top = _mm512_set1_ps(128.f);
  __m512 d0 = _mm512_roundscale_ps(r, kNearest);
  r = _mm512_mul_ps(_mm512_sub_ps(r, d0), b);
  __m512 d1 = _mm512_roundscale_ps(r, kNearest);
  const __mmask16 carry = _mm512_cmp_ps_mask(d1, top, _CMP_GE_OQ);
  d0 = _mm512_mask_add_ps(d0, carry, d0, _mm512_set1_ps(1.f));
  r = _mm512_mask_sub_ps(r, carry, r, b);
  d1 = _mm512_mask_mov_ps(d1, carry, _mm512_set1_ps(-128.f));
  r = _mm512_mul_ps(_mm512_sub_ps(r, d1), b);
  const __m512 d2 = _mm512_min_ps(_mm512_roundscale_ps(r, kNearest), _mm512_set1_ps(127.f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p0), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(d0)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p1), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(d1)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p2), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(d2)));
}

constexpr int64_t kChunk = 128;  // weights in 64 bytes

// Whether the VNNI path takes this product: one row, 4 bits, whole chunks, groups of whole lanes
// (MLX's group sizes 32, 64, 128).
inline bool vnni_applies(int64_t M, int64_t K, int gs, int bits) {
  return M == 1 && bits == 4 && K % kChunk == 0 && (gs == 32 || gs == 64 || gs == 128);
}

// x[K] -> parts and lane scales. False where x holds a non-finite value or a group of values below 2^-64
// (the float path takes those).
inline bool prepare_vnni(const float* x, int64_t K, int gs, VnniX& out) {
  const int64_t G = K / gs, nc = K / kChunk;
  std::vector<float> sx(G);
  for (int64_t g = 0; g < G; ++g) {
    __m512 m = _mm512_setzero_ps();
    for (int j = 0; j < gs; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + g * gs + j)));
    const float mx_ = _mm512_reduce_max_ps(m);
    // non-finite: keep inf/nan semantics; below 2^-64 (but not 0): 1/sx and the lane scales sw * sx / 2^16
    // would leave float32's normal range (x that small is left to the float path too)
    if (!std::isfinite(mx_) || (mx_ > 0.f && mx_ < 0x1p-64f)) return false;
    for (int j = 0; j < gs; j += 16)  // max drops NaNs: look for them
      if (_mm512_cmp_ps_mask(_mm512_loadu_ps(x + g * gs + j), _mm512_loadu_ps(x + g * gs + j), _CMP_UNORD_Q))
        return false;
    int e = 0;
    std::frexp(mx_ / 126.0f, &e);  // mx_ / 126 < 2^e
    sx[g] = mx_ > 0.f ? std::ldexp(1.0f, e) : 1.0f;
  }
  out.parts.resize(nc * 3 * 128);
  out.lane_scale.resize(nc * 16);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t c = 0; c < nc; ++c) {
    for (int j = 0; j < 16; ++j) out.lane_scale[c * 16 + j] = sx[(c * kChunk + 8 * j) / gs] * (1.0f / 65536.f);
    const float* xc = x + c * kChunk;
    int8_t* p = out.parts.data() + c * 384;  // part i at p + 128 i
    for (int t = 0; t < 4; ++t) {           // 32 values: bytes 16t..16t+15 of the chunk
      const __m512 inv = _mm512_set1_ps(1.0f / sx[(c * kChunk + 32 * t) / gs]);
      const __m512 a = _mm512_loadu_ps(xc + 32 * t), b = _mm512_loadu_ps(xc + 32 * t + 16);
      split3(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), inv), p + 16 * t, p + 128 + 16 * t, p + 256 + 16 * t);
      split3(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), inv), p + 64 + 16 * t, p + 192 + 16 * t,
             p + 320 + 16 * t);
    }
  }
  return true;
}

// out[n] = x . dequantize(w[n]) for the rows n = first[r] + i, r < R, i < count: R rows at a time, each from
// its own sequential stream, x's parts and lane scales loaded once for all R. xs[g] = sum of x over group g
// (the biases' part).
template <int R, typename T>  // T: the scales' and biases' dtype (float, _Float16 or bf16_t)
void vnni_rows(const VnniX& qx, const float* xs, const uint8_t* w, const T* scales, const T* biases, float* out,
               int64_t K, int gs, const int64_t (&first)[R], int64_t count) {
  const int64_t G = K / gs, nc = K / kChunk, row_bytes = K / 2;
  const int ng = (int)std::max<int64_t>(1, kChunk / gs);  // groups a chunk spans: 4, 2, 1
  const __mmask16 gmask = (__mmask16)((1u << ng) - 1);
  const int shift = gs == 32 ? 2 : gs == 64 ? 1 : 0;  // chunk c starts at group c << shift (gs <= 128)
  int32_t idx_[16];
  for (int j = 0; j < 16; ++j) idx_[j] = (int32_t)(8 * j / gs);
  const __m512i idx = _mm512_loadu_si512(idx_);
  const __m512i nib = _mm512_set1_epi8(15);
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* wr[R];
    const T* sr[R];
    __m512 t[R];
    for (int r = 0; r < R; ++r) {
      const int64_t n = first[r] + i;
      wr[r] = w + n * row_bytes;
      sr[r] = scales + n * G;
      t[r] = _mm512_setzero_ps();
      _mm_prefetch(reinterpret_cast<const char*>(sr[r] + G), _MM_HINT_T0);  // the next row's scales and biases
      _mm_prefetch(reinterpret_cast<const char*>(biases + n * G + G), _MM_HINT_T0);
    }
    for (int64_t c = 0; c < nc; ++c) {
      const int8_t* p = qx.parts.data() + c * 384;
      const __m512 l = _mm512_loadu_ps(qx.lane_scale.data() + 16 * c);
      const __m512i x0 = _mm512_loadu_si512(p), x0h = _mm512_loadu_si512(p + 64);
      const __m512i x1 = _mm512_loadu_si512(p + 128), x1h = _mm512_loadu_si512(p + 192);
      const __m512i x2 = _mm512_loadu_si512(p + 256), x2h = _mm512_loadu_si512(p + 320);
      for (int r = 0; r < R; ++r) {
        prefetch(wr[r] + 64 * c);
        const __m512i v = _mm512_loadu_si512(wr[r] + 64 * c);
        // the scale of each lane's group times x's: sw * sx / 65536
        const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(idx, load_groups(sr[r] + (c << shift), gmask)), l);
        const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0);
        a = _mm512_dpbusd_epi32(a, hi, x0h);
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, lo, x1);
        a = _mm512_dpbusd_epi32(a, hi, x1h);
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, lo, x2);
        a = _mm512_dpbusd_epi32(a, hi, x2h);
        t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, t[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t n = first[r] + i;
      out[n] = row_total(t[r], _mm512_setzero_ps(), biases + n * G, xs, G);
    }
  }
}

// Rows [n0, n1): two at a time, the first half's row i with the second half's row i (two sequential streams:
// 83.6 -> 87.7 tok/s 4-bit 270M decode, medians of 8 interleaved rounds; two adjacent rows a pass, or four
// streams, were slower), an odd last row alone.
template <typename T>
void qgemv_vnni(const VnniX& qx, const float* xs, const uint8_t* w, const T* scales, const T* biases, float* out,
                int64_t K, int gs, int64_t n0, int64_t n1) {
  const int64_t half = (n1 - n0) / 2;
  const int64_t two[2] = {n0, n0 + half}, last[1] = {n1 - 1};
  vnni_rows<2>(qx, xs, w, scales, biases, out, K, gs, two, half);
  if ((n1 - n0) % 2) vnni_rows<1>(qx, xs, w, scales, biases, out, K, gs, last, 1);
}
#endif
