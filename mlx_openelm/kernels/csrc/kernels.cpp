// mlx-openelm CPU fast path: decode-shaped (few-row) matrix products as MLX primitives.
//
//   gemv(x, w)                        x[..., K] @ w[N, K]^T                  (float32)
//   qgemv(x, w, scales, biases, g, b) x[..., K] @ dequantize(w)^T            (float32 x; scales and biases
//                                     float32, float16 or bfloat16, read as stored; MLX's affine layout:
//                                     b in {4, 8} bits packed little-end first into uint32 words along K,
//                                     one scale and bias per g values)
//
// Each weight row is read once per 8 rows of x, streamed by a small persistent thread pool; the
// caller (MLX's CPU stream thread) does the first share itself. Arithmetic is plain float32
// (no low-precision dot products), so results agree with mx.matmul / mx.quantized_matmul up to
// summation order.

#include <algorithm>
#include <cmath>
#include <optional>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <cerrno>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <sched.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// ------------------------------------------------------------------ thread pool

// How long an idle worker spins before it sleeps. A decode step runs its products a few hundred
// microseconds apart; waking a sleeping thread costs tens to hundreds of microseconds on a VM.
int spin_micros() {
  static const int us = [] {
    const char* s = std::getenv("MLX_OPENELM_SPIN_US");
    return s ? std::max(0, std::atoi(s)) : 500;
  }();
  return us;
}

// Work is cut into chunks claimed dynamically (one atomic word: generation | chunk count | next
// chunk), so a thread that the OS does not schedule (a busy shared machine) delays nobody: the
// others take its chunks. The caller (MLX's CPU stream thread) works too.
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      wake_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  // Run f(c) for every chunk c in [0, nchunks), on the caller and the workers. `linger`: the workers spin
  // for the next job afterwards (decoding: products follow each other within microseconds; sleeping at
  // once there cost ~15%, float16 270M 55.2 -> 47.1 tok/s) or, after a prompt's jobs, sleep at once and
  // leave the cores to MLX's ops between them (and to OpenBLAS's threads where a prompt product still uses
  // them). 512-token prefill, medians of 5-6 alternating processes, when OpenBLAS's threads ran the prompt
  // products: float16 310.5 -> 318.4, 4-bit 465 -> 503, bfloat16 545 -> 548 tok/s; with the products on
  // this pool, spinning after them instead: float16 323.9 -> 315.4 (6 rounds), so they still sleep.
  void run(int64_t nchunks, const std::function<void(int64_t)>& f, bool linger = true) {
    run_indexed(nchunks, [&f](int64_t c, int) { f(c); }, linger);
  }

  // The same with f(c, t): t in [0, size()) names the thread running chunk c (0: the caller), so a job can
  // keep one scratch buffer per thread.
  void run_indexed(int64_t nchunks, const std::function<void(int64_t, int)>& f, bool linger = true) {
    if (n_ == 1 || nchunks <= 1) {
      for (int64_t c = 0; c < nchunks; ++c) f(c, 0);
      return;
    }
    nchunks = std::min<int64_t>(nchunks, 0xffff);
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time (several MLX streams)
    job_ = &f;
    linger_.store(linger, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    uint64_t gen = (++gen_) & 0xffffffffu;
    state_.store((gen << 32) | ((uint64_t)nchunks << 16), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      wake_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(gen, 0);
    int spins = 0;
    while (done_.load(std::memory_order_acquire) != nchunks) {
      pause();
      if (++spins % 64 == 0) sched_yield();  // a claimed chunk's thread may be off-core
    }
  }

 private:
  static inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  void work(uint64_t gen, int tid) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != gen) return;
      uint64_t total = (s >> 16) & 0xffff, next = s & 0xffff;
      if (next >= total) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*job_)((int64_t)next, tid);  // valid: the caller waits for this chunk before the next job
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void loop(int tid) {
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly (a decode step's products follow each other within microseconds), then sleep.
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      const bool linger = linger_.load(std::memory_order_acquire);
      while (wake_.load(std::memory_order_acquire) == seen) {
        pause();
        if (linger && ++spins % 256 != 0) continue;
        // Give the core up now and then: on 2 cores the Python thread building the next step's graph
        // needs one (measured, 4-bit 270M decode: 15.3-17.2 -> 12.9-14.9 ms a token).
        if (linger) sched_yield();
        if (!linger || std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_micros())) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return wake_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = wake_.load(std::memory_order_acquire);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
      }
      work(state_.load(std::memory_order_acquire) >> 32, tid);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> wake_{0}, state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> linger_{true};
  uint64_t gen_ = 0;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  bool stop_ = false;
};

int default_threads() {
  if (const char* s = std::getenv("MLX_OPENELM_THREADS")) {
    int n = std::atoi(s);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool* g_pool = nullptr;
std::mutex g_pool_mu;
int g_threads = 0;  // 0: default

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_pool == nullptr) {
    static bool registered = false;
    if (!registered) {
      // A forked child has none of the parent's threads: forget (leak) the pool there.
      pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
      registered = true;
    }
    g_pool = new Pool(g_threads > 0 ? g_threads : default_threads());
  }
  return *g_pool;
}

void set_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_threads = n;
  delete g_pool;  // the next product starts a pool of the new size
  g_pool = nullptr;
}

int num_threads() { return pool().size(); }

// Split [0, n) rows into chunks of at least 256 KiB of weights (a few per thread); small products
// run on the calling thread only.
template <typename F>
void parallel_rows(int64_t n, int64_t bytes, F&& f, bool linger = true) {
  constexpr int64_t kMinChunkBytes = 1 << 18;
  Pool& p = pool();
  int64_t nchunks = std::min<int64_t>(4 * p.size(), std::max<int64_t>(1, bytes / kMinChunkBytes));
  int64_t chunk = (n + nchunks - 1) / nchunks;
  chunk = (chunk + 3) / 4 * 4;
  nchunks = (n + chunk - 1) / chunk;
  std::function<void(int64_t)> job = [&](int64_t c) {
    int64_t a = c * chunk, b = std::min<int64_t>(n, a + chunk);
    if (a < b) f(a, b);
  };
  p.run(nchunks, job, linger);
}

// How far ahead (bytes) the one-row quantized kernels prefetch their weight stream: each thread reads
// its rows as one sequential stream, and the hardware prefetcher alone leaves the loads waiting on
// memory (measured on one core: 4-bit 14-16.5 -> 20-21 G weights/s with 2 KB; in the 270M decode loop
// 4-bit and 8-bit ~5-7% faster, float16 ~10% slower: the float kernels, bandwidth-bound, do not).
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 3); }

// ------------------------------------------------------------------ float32 kernels

typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 8 weights at p as floats: float32, bfloat16 (the high half of a float32) or IEEE float16.
struct bf16_t {
  uint16_t bits;
};
typedef uint16_t v8u16 __attribute__((vector_size(16)));

inline v8f load8w(const float* p) { return load8(p); }

inline v8f load8w(const bf16_t* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  v8i i = __builtin_convertvector(h, v8i) << 16;
  v8f v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

inline v8f load8w(const _Float16* p) {
#if defined(__F16C__)
  __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = (float)p[i];
  return v;
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  uint32_t u = (uint32_t)x.bits << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(_Float16 x) { return (float)x; }

inline uint32_t bf16_bits(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40;
  return (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
}

// x rounded to nearest even in T (as MLX's astype): the KV cache's stores
template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline _Float16 from_float<_Float16>(float x) { return (_Float16)x; }
template <>
inline bf16_t from_float<bf16_t>(float x) { return bf16_t{(uint16_t)bf16_bits(x)}; }

// f((T*)nullptr) with T the element type of dt (float16, bfloat16, else float32): the one dtype dispatch of
// the kernels (weights, scales and biases, KV caches)
template <typename F>
inline void with_float_type(mx::Dtype dt, F&& f) {
  if (dt == mx::float16)
    f(static_cast<_Float16*>(nullptr));
  else if (dt == mx::bfloat16)
    f(static_cast<bf16_t*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

// dst[0, n) = src[i0, i0 + n) as float32: float32, bfloat16 or float16 values (exact).
template <typename T>
inline void widen(const T* src, int64_t i0, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v = load8w(src + i0 + i);
    std::memcpy(dst + i, &v, sizeof(v));
  }
  for (; i < n; ++i) dst[i] = to_float(src[i0 + i]);
}

inline void widen(mx::Dtype dt, const void* src, int64_t i0, int64_t n, float* dst) {
  with_float_type(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same_v<T, float>)
      std::memcpy(dst, static_cast<const float*>(src) + i0, n * sizeof(float));
    else
      widen(static_cast<const T*>(src), i0, n, dst);
  });
}

// A quantized layer's scales and biases (one of each per group of weights) as the model holds them: float32,
// or float16/bfloat16 as MLX quantizes a half model and its files store them. Kept half on the CPU they are
// 36 instead of 40 bytes per 64 weights of a 4-bit layer read each decoding step (llama.cpp's Q4_0 reads 36
// too) and half the memory. Every kernel reads them in their dtype (with_affine) and widens each value as
// it uses it (to_float / load_groups: exact).
struct Affine {
  const void* s = nullptr;
  const void* b = nullptr;
  mx::Dtype dt = mx::float32;
};

// Whether scales and biases fit a quantized w [N, K * bits / 32] (uint32 words): one value per group of gs
// weights of each row, both float32, float16 or bfloat16 alike.
inline bool affine_fits(const mx::array& w, const mx::array& s, const mx::array& b, int64_t K, int gs) {
  const mx::Dtype dt = s.dtype();
  return (dt == mx::float32 || dt == mx::float16 || dt == mx::bfloat16) && b.dtype() == dt && w.dtype() == mx::uint32 &&
         w.ndim() == 2 && gs > 0 && gs % 32 == 0 && K % gs == 0 && s.ndim() == 2 && s.shape(0) == w.shape(0) &&
         s.shape(1) == K / gs && b.shape() == s.shape();
}

// f(scales, biases) with the arrays as pointers of their dtype (float, _Float16 or bf16_t).
template <typename F>
inline void with_affine(const Affine& a, F&& f) {
  with_float_type(a.dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    f(static_cast<const T*>(a.s), static_cast<const T*>(a.b));
  });
}

// The Affine of a primitive's inputs i (scales) and i + 1 (biases); an empty one for float weights.
inline Affine affine_of(const std::vector<mx::array>& in, size_t i, int bits) {
  if (!bits) return {};
  return {in[i].data<void>(), in[i + 1].data<void>(), in[i].dtype()};
}

inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef float v16f __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum16(v16f v) {
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return hsum(lo + hi);
}

inline v16f join8(v8f a, v8f b) {
  v16f v;
  std::memcpy(&v, &a, sizeof(a));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(a), &b, sizeof(b));
  return v;
}

inline v16f load16w(const float* p) { return load16(p); }

inline v16f load16w(const bf16_t* p) {
#if defined(__AVX512F__)
  __m512i i = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  v16f v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
#else
  return join8(load8w(p), load8w(p + 8));
#endif
}

inline v16f load16w(const _Float16* p) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v16f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  return join8(load8w(p), load8w(p + 8));
#endif
}

#if defined(__AVX512F__)
inline __m512 ldw(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ldw(const bf16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 ldw(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// One row of x (decode). AVX-512: weight rows one after another (a single sequential stream through
// memory: 16.8 GB/s a core here vs 12.7 for four interleaved rows), four 16-wide accumulators.
template <typename W>
void gemv_one(const float* x, const W* w, float* out, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(__AVX512F__)
  // rows one after another: a single sequential stream through memory
  for (; n < n1; ++n) {
    const W* wr = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), ldw(wr + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), ldw(wr + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), ldw(wr + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), ldw(wr + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), ldw(wr + k), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; ++k) s += x[k] * to_float(wr[k]);
    out[n] = s;
  }
#else
  for (; n + 4 <= n1; n += 4) {
    const W* wr[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
    v16f a0[4] = {}, a1[4] = {};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const v16f x0 = load16(x + k), x1 = load16(x + k + 16);
      for (int r = 0; r < 4; ++r) {
        a0[r] += x0 * load16w(wr[r] + k);
        a1[r] += x1 * load16w(wr[r] + k + 16);
      }
    }
    for (int r = 0; r < 4; ++r) {
      float s = hsum16(a0[r] + a1[r]);
      for (int64_t kk = k; kk < K; ++kk) s += x[kk] * to_float(wr[r][kk]);
      out[n + r] = s;
    }
  }
#endif
  for (; n < n1; ++n) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[k] * to_float(w[n * K + k]);
    out[n] = s;
  }
}

inline v16f bytes_to_float16(v16u8 b) {
  return __builtin_convertvector(__builtin_convertvector(b, v16i), v16f);
}

// The low and the high nibbles of 16 bytes at p as floats.
inline void load_nibbles_as_float16(const uint8_t* p, v16f& lo_f, v16f& hi_f) {
#if defined(__AVX512F__) || defined(__AVX2__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  __m128i lo = _mm_and_si128(b, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
#if defined(__AVX512F__)
  __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
  __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
  std::memcpy(&lo_f, &a, 64);
  std::memcpy(&hi_f, &c, 64);
#else
  __m256 a0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  __m256 a1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  std::memcpy(&lo_f, &a0, 32);
  std::memcpy(reinterpret_cast<char*>(&lo_f) + 32, &a1, 32);
  std::memcpy(&hi_f, &c0, 32);
  std::memcpy(reinterpret_cast<char*>(&hi_f) + 32, &c1, 32);
#endif
#else
  v16u8 b;
  std::memcpy(&b, p, 16);
  lo_f = bytes_to_float16(b & (uint8_t)15);
  hi_f = bytes_to_float16(b >> 4);
#endif
}

// 16 bytes at p as floats (GCC scalarizes the generic form for a plain load; use the ISA directly).
inline v16f load_bytes_as_float16(const uint8_t* p) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  v16f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  v16f v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  v16u8 b;
  std::memcpy(&b, p, 16);
  return bytes_to_float16(b);
#endif
}

// out[m, n] = sum_k x[m, k] w[n, k] for n in [n0, n1); x is M x K, out is M x N (row stride ldo).
template <typename W, int M, int R>
void gemv_block(const float* x, const W* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    v8f acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = v8f{};
    const W* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      v8f wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8w(wr[r] + k);
      for (int m = 0; m < M; ++m) {
        v8f xv = load8(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * to_float(wr[r][kk]);
        out[m * ldo + n + r] = s;
      }
  }
  if (n < n1) gemv_block<W, M, 1>(x, w, out, K, ldo, n, n1);
}

template <typename W, int M>
void gemv_m(const float* x, const W* w, float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  gemv_block<W, M, R>(x, w, out, K, ldo, n0, n1);
}

template <typename W>
void gemv_rows(int M, const float* x, const W* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) return gemv_one<W>(x, w, out, K, n0, n1);
  for (int m0 = 0; m0 < M; m0 += 8) {
    int mb = std::min(8, M - m0);
    const float* xb = x + m0 * K;
    float* ob = out + m0 * N;
    switch (mb) {
      case 1: gemv_m<W, 1>(xb, w, ob, K, N, n0, n1); break;
      case 2: gemv_m<W, 2>(xb, w, ob, K, N, n0, n1); break;
      case 3: gemv_m<W, 3>(xb, w, ob, K, N, n0, n1); break;
      case 4: gemv_m<W, 4>(xb, w, ob, K, N, n0, n1); break;
      case 5: gemv_m<W, 5>(xb, w, ob, K, N, n0, n1); break;
      case 6: gemv_m<W, 6>(xb, w, ob, K, N, n0, n1); break;
      case 7: gemv_m<W, 7>(xb, w, ob, K, N, n0, n1); break;
      default: gemv_m<W, 8>(xb, w, ob, K, N, n0, n1); break;
    }
  }
}

// ------------------------------------------------------------------ quantized kernels

// xp: x rearranged per 32 values (4-bit: the 16 even then the 16 odd ones, matching the low and high
// nibbles of 16 packed bytes; 8-bit: unchanged). xs[m, g]: sum of x over group g.
template <int M, int BITS, typename T>
void qgemv_block(const float* xp, const float* xs, const uint8_t* w, const T* scales, const T* biases, float* out,
                 int64_t K, int64_t ldo, int gs, int64_t n0, int64_t n1) {
  const int64_t G = K / gs;
  const int64_t row_bytes = K * BITS / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    const T* sr = scales + n * G;
    const T* br = biases + n * G;
    v16f tot[M];
    float bsum[M];
    for (int m = 0; m < M; ++m) {
      tot[m] = v16f{};
      bsum[m] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
      v16f acc[M];
      for (int m = 0; m < M; ++m) acc[m] = v16f{};
      const uint8_t* wg = wr + g * gs * BITS / 8;
      const int64_t k0 = g * gs;
      for (int j = 0; j < gs; j += 32) {
        v16f q0, q1;
        if constexpr (BITS == 4) {
          load_nibbles_as_float16(wg + j / 2, q0, q1);
        } else {
          q0 = load_bytes_as_float16(wg + j);
          q1 = load_bytes_as_float16(wg + j + 16);
        }
        for (int m = 0; m < M; ++m) {
          const float* xm = xp + m * K + k0 + j;
          acc[m] += q0 * load16(xm) + q1 * load16(xm + 16);
        }
      }
      const float s = to_float(sr[g]), bi = to_float(br[g]);
      for (int m = 0; m < M; ++m) {
        tot[m] += acc[m] * s;
        bsum[m] += bi * xs[m * G + g];
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + n] = hsum16(tot[m]) + bsum[m];
  }
}

#if defined(__AVX512F__)
// 32 weights (4-bit: 16 bytes, low nibbles then high; 8-bit: 32 bytes) times the matching 32 values of xp.
template <int BITS>
inline __m512 q32_dot(const uint8_t* w, const float* x, __m512 acc0, __m512& acc1) {
  __m512 q0, q1;
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m128i m = _mm_set1_epi8(15);
    q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
    q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
  } else {
    q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
    q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  }
  acc1 = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), acc1);
  return _mm512_fmadd_ps(q0, _mm512_loadu_ps(x), acc0);
}

// A quantized row's result: its two scaled-sum accumulators plus the biases' part, one dot product of the
// row's G biases with the per-group sums of x.
// The first popcount(m) (m = 2^j - 1) of 16 scales or biases at p as float32, the rest 0: the decode kernels
// read them in their stored dtype (a widened copy a row cost ~11% of a 4-bit product's speed).
inline __m512 load_groups(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_groups(const _Float16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load_groups(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <typename T>
inline float row_total(__m512 t0, __m512 t1, const T* br, const float* xs, int64_t G) {
  __m512 bsum = _mm512_setzero_ps();
  for (int64_t h = 0; h < G; h += 16) {
    const __mmask16 mk = G - h >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - h)) - 1);
    bsum = _mm512_fmadd_ps(load_groups(br + h, mk), _mm512_maskz_loadu_ps(mk, xs + h), bsum);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1)) + _mm512_reduce_add_ps(bsum);
}

// One row of x (decode), one weight row after another: per group, sum(q * x) in registers (two
// independent chains), scaled into the row total; the biases' part is one dot product of the row's
// biases with the per-group sums of x at the end.
// PER = gs / 32 as a constant (32, 64, 128: the inner loop unrolled; 0: any gs, ~1.5x slower).
template <int BITS, int PER, typename T>
void qgemv_one(const float* xp, const float* xs, const uint8_t* w, const T* scales, const T* biases, float* out,
               int64_t K, int gs, int64_t n0, int64_t n1) {
  const int64_t G = K / gs, row_bytes = K * BITS / 8, gbytes = gs * BITS / 8;
  const int per = PER ? PER : gs / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    const T* sr = scales + n * G;
    const T* br = biases + n * G;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0;
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {  // two groups at once: four independent FMA chains
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
      const uint8_t* wa = wr + g * gbytes;
      const float* xa = xp + g * gs;
      for (int64_t line = 0; line < 2 * gbytes; line += 64) prefetch(wa + line);
      for (int j = 0; j < per; ++j) {
        a0 = q32_dot<BITS>(wa + j * 32 * BITS / 8, xa + 32 * j, a0, a1);
        c0 = q32_dot<BITS>(wa + gbytes + j * 32 * BITS / 8, xa + gs + 32 * j, c0, c1);
      }
      t0 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(to_float(sr[g])), t0);
      t1 = _mm512_fmadd_ps(_mm512_add_ps(c0, c1), _mm512_set1_ps(to_float(sr[g + 1])), t1);
    }
    for (; g < G; ++g) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      for (int j = 0; j < per; ++j) a0 = q32_dot<BITS>(wr + g * gbytes + j * 32 * BITS / 8, xp + g * gs + 32 * j, a0, a1);
      t0 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(to_float(sr[g])), t0);
    }
    out[n] = row_total(t0, t1, br, xs, G);
  }
}
#endif

template <int BITS>
void qgemv_rows(int M, const float* xp, const float* xs, const uint8_t* w, const Affine& qa, float* out, int64_t K,
                int64_t N, int gs, int64_t n0, int64_t n1) {
  const int64_t G = K / gs;
#if defined(__AVX512F__)
  if (M == 1) {
    return with_affine(qa, [&](const auto* s, const auto* b) {
      switch (gs) {
        case 32: return qgemv_one<BITS, 1>(xp, xs, w, s, b, out, K, gs, n0, n1);
        case 64: return qgemv_one<BITS, 2>(xp, xs, w, s, b, out, K, gs, n0, n1);
        case 128: return qgemv_one<BITS, 4>(xp, xs, w, s, b, out, K, gs, n0, n1);
        default: return qgemv_one<BITS, 0>(xp, xs, w, s, b, out, K, gs, n0, n1);
      }
    });
  }
#endif
  for (int m0 = 0; m0 < M; m0 += 4) {
    int mb = std::min(4, M - m0);
    const float* xb = xp + m0 * K;
    const float* sb = xs + m0 * G;
    float* ob = out + m0 * N;
    with_affine(qa, [&](const auto* s, const auto* b) {
      switch (mb) {
        case 1: qgemv_block<1, BITS>(xb, sb, w, s, b, ob, K, N, gs, n0, n1); break;
        case 2: qgemv_block<2, BITS>(xb, sb, w, s, b, ob, K, N, gs, n0, n1); break;
        case 3: qgemv_block<3, BITS>(xb, sb, w, s, b, ob, K, N, gs, n0, n1); break;
        default: qgemv_block<4, BITS>(xb, sb, w, s, b, ob, K, N, gs, n0, n1); break;
      }
    });
  }
}

// xs[g] = the sum of x over group g (the biases' part of a quantized product).
inline void group_sums(const float* x, int64_t K, int gs, float* xs) {
  for (int64_t g = 0; g < K / gs; ++g) {
    float s = 0.f;
    for (int j = 0; j < gs; ++j) s += x[g * gs + j];
    xs[g] = s;
  }
}

// x [M, K] -> xr (4-bit: per 32 values the 16 even then the 16 odd ones, matching the low and high
// nibbles of 16 packed bytes; 8-bit: unchanged) and xs[m, g], the sum of x over group g.
inline void prepare_qx(const float* xp, int64_t M, int64_t K, int gs, int bits, float* xr, float* xs) {
  const int64_t G = K / gs;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xp + m * K;
    float* dst = xr + m * K;
    group_sums(src, K, gs, xs + m * G);
    if (bits == 4) {
      for (int64_t k = 0; k < K; k += 32)
        for (int j = 0; j < 16; ++j) {
          dst[k + j] = src[k + 2 * j];
          dst[k + 16 + j] = src[k + 2 * j + 1];
        }
    } else {
      std::memcpy(dst, src, K * sizeof(float));
    }
  }
}

#include "qgemv_vnni.h"

std::atomic<bool> g_vnni{true};  // tests and benchmarks turn the integer-dot path off to compare

bool set_vnni(bool on) { return g_vnni.exchange(on); }
bool has_vnni() {
#ifdef MLX_OPENELM_VNNI
  return true;
#else
  return false;
#endif
}

// out[M, N] = x @ W^T (+ res) on every core, W float32/bfloat16/float16 (bits 0) or 4/8-bit affine:
// the one product behind gemv, qgemv and fused_linear.
inline void product(const float* x, int64_t M, int64_t K, int64_t N, mx::Dtype wt, const void* w, const Affine& qa,
                    int bits, int gs, const float* res, float* out) {
  auto add_res = [&](int64_t a, int64_t b) {
    if (res)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = a; n < b; ++n) out[m * N + n] += res[m * N + n];
  };
  if (bits) {
#ifdef MLX_OPENELM_VNNI
    VnniX qx;
    if (g_vnni.load(std::memory_order_relaxed) && vnni_applies(M, K, gs, bits) && prepare_vnni(x, K, gs, qx)) {
      std::vector<float> xs(K / gs);
      group_sums(x, K, gs, xs.data());
      const uint8_t* q = static_cast<const uint8_t*>(w);
      parallel_rows(N, N * K / 2, [&](int64_t a, int64_t b) {
        with_affine(qa, [&](const auto* s, const auto* bi) { qgemv_vnni(qx, xs.data(), q, s, bi, out, K, gs, a, b); });
        add_res(a, b);
      });
      return;
    }
#endif
    std::vector<float> xr(M * K), xs(M * (K / gs));
    prepare_qx(x, M, K, gs, bits, xr.data(), xs.data());
    const uint8_t* q = static_cast<const uint8_t*>(w);
    parallel_rows(N, N * K * bits / 8, [&](int64_t a, int64_t b) {
      if (bits == 4)
        qgemv_rows<4>((int)M, xr.data(), xs.data(), q, qa, out, K, N, gs, a, b);
      else
        qgemv_rows<8>((int)M, xr.data(), xs.data(), q, qa, out, K, N, gs, a, b);
      add_res(a, b);
    });
    return;
  }
  auto run = [&](auto* W) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(W)>>;
    parallel_rows(N, N * K * (int64_t)sizeof(T), [&](int64_t a, int64_t b) {
      gemv_rows<T>((int)M, x, W, out, K, N, a, b);
      add_res(a, b);
    });
  };
  with_float_type(wt, [&](auto* tag) { run(static_cast<const std::remove_pointer_t<decltype(tag)>*>(w)); });
}

// ------------------------------------------------------------------ primitives

mx::Shape out_shape(const mx::array& x, int64_t n) {
  mx::Shape s = x.shape();
  s.back() = (int)n;
  return s;
}

// The CPU command encoder of stream `s` with every input and `out` registered, as each primitive's
// eval_cpu does before it dispatches (out's buffer must be set first).
mx::cpu::CommandEncoder& encoder_for(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}

// The same with a fresh buffer for out (every primitive here but CacheWrite, which may reuse its input's).
mx::cpu::CommandEncoder& encoder_with_new_output(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return encoder_for(s, inputs, out);
}

class Gemv : public mx::UnaryPrimitive {
 public:
  explicit Gemv(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t K = w.shape(1), N = w.shape(0), M = x.size() / K;
    enc.dispatch([xp = x.data<float>(), wp = w.data<void>(), wt = w.dtype(), op = out.data<float>(), M, N, K]() {
      product(xp, M, K, N, wt, wp, Affine{}, 0, 0, nullptr, op);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.gemv runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto& x = primals[0];
    const auto& w = primals[1];
    const auto& c = cotangents[0];
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {
        grads.push_back(mx::matmul(c, mx::astype(w, mx::float32, stream()), stream()));
      } else {
        int64_t K = w.shape(1), N = w.shape(0);
        auto c2 = mx::reshape(c, {-1, (int)N}, stream());
        auto x2 = mx::reshape(x, {-1, (int)K}, stream());
        grads.push_back(mx::astype(mx::matmul(mx::transpose(c2, stream()), x2, stream()), w.dtype(), stream()));
      }
    }
    return grads;
  }
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    std::vector<mx::array> terms;
    for (size_t i = 0; i < argnums.size(); ++i) {
      if (argnums[i] == 0)
        terms.push_back(mx::matmul(tangents[i], mx::transpose(mx::astype(primals[1], mx::float32, stream()), stream()), stream()));
      else
        terms.push_back(mx::matmul(primals[0], mx::transpose(mx::astype(tangents[i], mx::float32, stream()), stream()), stream()));
    }
    mx::array r = terms[0];
    for (size_t i = 1; i < terms.size(); ++i) r = mx::add(r, terms[i], stream());
    return {r};
  }
  const char* name() const override { return "OpenELMGemv"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {out_shape(inputs[0], inputs[1].shape(0))};
  }
};

class QGemv : public mx::UnaryPrimitive {
 public:
  QGemv(mx::Stream s, int group_size, int bits) : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t N = w.shape(0), K = w.shape(1) * 32 / bits_, M = x.size() / K;
    enc.dispatch([xp = x.data<float>(), wp = w.data<void>(), qa = affine_of(inputs, 2, bits_), op = out.data<float>(),
                  M, N, K, gs = gs_, bits = bits_]() { product(xp, M, K, N, mx::uint32, wp, qa, bits, gs, nullptr, op); });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.qgemv runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a != 0) throw std::invalid_argument("qgemv: no gradient with respect to the quantized weights");
      grads.push_back(mx::quantized_matmul(cotangents[0], primals[1], primals[2], primals[3], false, gs_, bits_,
                                           "affine", stream()));
    }
    return grads;
  }
  const char* name() const override { return "OpenELMQGemv"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QGemv&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {out_shape(inputs[0], inputs[1].shape(0))};
  }

 private:
  int gs_, bits_;
};

// rows [n0, n1) of W [N, K] as float32 into dst [(n1 - n0), K]: W float32/bfloat16/float16 (bits 0) or
// 4/8-bit affine (MLX's packed layout, one scale and bias per gs values). Serves dequantize, to_float32
// and the tiled prompt products.
inline void widen_rows(const mx::Dtype& wt, const void* w, const Affine& qa, int bits, int gs, int64_t K, int64_t n0,
                       int64_t n1, float* dst) {
  if (bits) {
    const int64_t G = K / gs;
    const uint8_t* q = static_cast<const uint8_t*>(w);
    with_affine(qa, [&](const auto* sc, const auto* bi) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = q + n * K * bits / 8;
        float* o = dst + (n - n0) * K;
        for (int64_t g = 0; g < G; ++g) {
          const float s = to_float(sc[n * G + g]), c = to_float(bi[n * G + g]);
          const int64_t k0 = g * gs;
          if (bits == 4) {
            for (int j = 0; j < gs / 2; ++j) {
              const uint8_t v = wr[k0 / 2 + j];
              o[k0 + 2 * j] = s * (float)(v & 15) + c;
              o[k0 + 2 * j + 1] = s * (float)(v >> 4) + c;
            }
          } else {
            for (int j = 0; j < gs; ++j) o[k0 + j] = s * (float)wr[k0 + j] + c;
          }
        }
      }
    });
    return;
  }
  widen(wt, w, n0 * K, (n1 - n0) * K, dst);
}

// swiglu: W = [Wg; Wu] is a SwiGLU's fused first projection (2H rows) and the result is
// silu(x Wg^T) * (x Wu^T), [M, H]: a tile of hidden units at a time (its gate and up rows widened, one
// sgemm, then the product), so the [M, 2H] projection output is never held whole.
// w = scale * q + bias as float32 [N, K] (for many-row products: then BLAS).
class Dequant : public mx::UnaryPrimitive {
 public:
  Dequant(mx::Stream s, int group_size, int bits) : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& w = inputs[0];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t N = w.shape(0), K = w.shape(1) * 32 / bits_;
    enc.dispatch([wp = w.data<void>(), qa = affine_of(inputs, 1, bits_), op = out.data<float>(), N, K, gs = gs_,
                  bits = bits_]() {
      parallel_rows(N, N * K * 4, [&](int64_t a, int64_t b) {
        widen_rows(mx::uint32, wp, qa, bits, gs, K, a, b, op + a * K);
      }, false);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.dequantize runs on the CPU only");
  }
  const char* name() const override { return "OpenELMDequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Dequant&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), (int)((int64_t)inputs[0].shape(1) * 32 / bits_)}};
  }

 private:
  int gs_, bits_;
};

// float16/bfloat16 [N, K] -> float32 (for many-row products: then BLAS); MLX's own CPU astype
// converts ~0.4 G values/s, this one streams at memory speed on every core.
class ToFloat : public mx::UnaryPrimitive {
 public:
  explicit ToFloat(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& w = inputs[0];
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t K = w.ndim() ? w.shape(-1) : 1, N = w.size() / std::max<int64_t>(K, 1);
    enc.dispatch([wp = w.data<void>(), wt = w.dtype(), op = out.data<float>(), N, K]() {
      parallel_rows(N, N * K * 6, [&](int64_t a, int64_t b) {
        widen_rows(wt, wp, Affine{}, 0, 0, K, a, b, op + a * K);
      }, false);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.to_float32 runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>&, const std::vector<mx::array>&) override {
    return {mx::astype(cotangents[0], primals[0].dtype(), stream())};
  }
  const char* name() const override { return "OpenELMToFloat32"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) throw std::invalid_argument("the mlx_openelm kernels run on the CPU device only");
  return st;
}

// a as the row-contiguous input a kernel reads: a itself where it already is one — evaluated and row-contiguous
// (weights, scales, norms), or the not yet evaluated output of one of these primitives (always freshly
// allocated, or a whole cache) — else MLX's contiguous copy. mx::contiguous alone adds a graph node for every
// input, 24 a decoder layer: ~380 nodes in a 270M decoding step.
mx::array row_contiguous(const mx::array& a, mx::Stream st) {
  const bool ready = a.is_available() ? a.flags().row_contiguous && a.data_size() == a.size()
                                      : a.has_primitive() && std::strncmp(a.primitive().name(), "OpenELM", 7) == 0;
  return ready ? a : mx::contiguous(a, false, st);
}

mx::array gemv(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  if (x.dtype() != mx::float32 || (w.dtype() != mx::float32 && w.dtype() != mx::bfloat16 && w.dtype() != mx::float16))
    throw std::invalid_argument("gemv: x must be float32 and w float32, bfloat16 or float16");
  if (w.ndim() != 2 || x.ndim() < 1 || x.shape(-1) != w.shape(1)) {
    std::ostringstream msg;
    msg << "gemv: x's last axis (" << (x.ndim() ? x.shape(-1) : 0) << ") must match w[N, K]'s K";
    throw std::invalid_argument(msg.str());
  }
  auto xc = row_contiguous(x, st);
  auto wc = row_contiguous(w, st);
  return mx::array(out_shape(x, w.shape(0)), mx::float32, std::make_shared<Gemv>(st), {xc, wc});
}

mx::array qgemv(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                int group_size, int bits, mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  if (bits != 4 && bits != 8) throw std::invalid_argument("qgemv: bits must be 4 or 8");
  if (group_size % 32 != 0 || group_size <= 0) throw std::invalid_argument("qgemv: group_size must be a multiple of 32");
  if (x.dtype() != mx::float32 || w.dtype() != mx::uint32)
    throw std::invalid_argument("qgemv: x must be float32 and w uint32");
  if (w.ndim() != 2 || x.ndim() < 1) throw std::invalid_argument("qgemv: w must be 2-D and x at least 1-D");
  int64_t K = (int64_t)w.shape(1) * 32 / bits;
  if (x.shape(-1) != K || !affine_fits(w, scales, biases, K, group_size))
    throw std::invalid_argument("qgemv: x, w, scales and biases do not match (scales and biases: float32, float16 or "
                                "bfloat16 alike, one per group)");
  auto c = [&](const mx::array& a) { return row_contiguous(a, st); };
  return mx::array(out_shape(x, w.shape(0)), mx::float32, std::make_shared<QGemv>(st, group_size, bits),
                   {c(x), c(w), c(scales), c(biases)});
}

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size, int bits,
                     mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  if (bits != 4 && bits != 8) throw std::invalid_argument("dequantize: bits must be 4 or 8");
  if (group_size % 32 != 0 || group_size <= 0) throw std::invalid_argument("dequantize: group_size must be a multiple of 32");
  const int64_t K = w.ndim() == 2 ? (int64_t)w.shape(1) * 32 / bits : 0;
  if (!affine_fits(w, scales, biases, K, group_size))
    throw std::invalid_argument("dequantize: w (uint32 [N, K * bits / 32]), scales and biases (float32, float16 or "
                                "bfloat16 alike, one per group) do not match");
  auto c = [&](const mx::array& a) { return row_contiguous(a, st); };
  return mx::array({w.shape(0), (int)K}, mx::float32, std::make_shared<Dequant>(st, group_size, bits),
                   {c(w), c(scales), c(biases)});
}

mx::array to_float32(const mx::array& w, mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  if (w.dtype() != mx::bfloat16 && w.dtype() != mx::float16)
    throw std::invalid_argument("to_float32: w must be bfloat16 or float16");
  return mx::array(w.shape(), mx::float32, std::make_shared<ToFloat>(st), {row_contiguous(w, st)});
}

// Weights in 2 MB pages. Decoding streams every weight once a token; in 4 KB pages the hardware prefetchers
// stop at every page boundary and the TLB misses every 4 KB: measured, float16 270M with the 2 MB-aligned
// interiors of its buffers collapsed into huge pages (69% of the bytes), the products' stream 24.7 -> 29.8 GB/s
// and decoding +20%. MLX's CPU allocator aligns nothing beyond 16 bytes, and collapsing memory in place
// (MADV_COLLAPSE) ran at ~190 MB/s here, so huge_page_pack copies arrays instead, one after another (64-byte
// aligned, in the order given) into one mapping of their own that starts on a 2 MB boundary and is advised for
// huge pages before it is written: the copy faults it in as 2 MB pages where the kernel has them (THP "always"
// or "madvise"; else 4 KB pages, as before). Only the mapping's tail short of 2 MB stays in small pages. The
// mapping goes when the last of its arrays does. What it costs: faulting in huge pages is slower than small ones
// (this VM: a float16 270M model's 543 MB loaded in 1.6-3.3 s instead of 0.29 s, the copy into 4 KB pages
// taking 0.55 s; 4.0-4.4 s with one thread, so the pool copies).
std::atomic<int64_t> g_huge_bytes{0};  // bytes mapped for packs now (MLX's memory counters do not see them)

struct HugeMapping {
  char* p;
  size_t len;
  ~HugeMapping() {
    munmap(p, len);
    g_huge_bytes.fetch_sub((int64_t)len);
  }
};

std::vector<mx::array> huge_page_pack(const std::vector<mx::array>& arrays) {
  constexpr size_t kHuge = size_t(2) << 20, kPage = 4096, kAlign = 64;
  // each array's data 64-byte aligned with MLX's 8-byte buffer header in the gap before it; arrays not yet
  // evaluated, or views (strided, broadcast), stay as they are
  auto packs = [](const mx::array& a) { return a.is_available() && a.flags().row_contiguous && a.data_size() == a.size(); };
  std::vector<size_t> at;
  size_t total = 0;
  for (const auto& a : arrays) {
    at.push_back(total + kAlign);
    if (packs(a)) total += kAlign + (a.nbytes() + kAlign - 1) / kAlign * kAlign;
  }
  if (total == 0) return arrays;
  const size_t len = (total + kPage - 1) / kPage * kPage, span = len + kHuge;
  char* raw = static_cast<char*>(mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (raw == MAP_FAILED) return arrays;
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(uintptr_t)(kHuge - 1));
  if (base > raw) munmap(raw, base - raw);
  if (raw + span > base + len) munmap(base + len, raw + span - (base + len));
  madvise(base, len, MADV_HUGEPAGE);
  g_huge_bytes.fetch_add((int64_t)len);
  std::shared_ptr<HugeMapping> mapping(new HugeMapping{base, len});
  std::vector<mx::array> out;
  struct Piece {
    char* dst;
    const char* src;
    size_t n;
  };
  std::vector<Piece> pieces;  // the copies in 2 MB pieces, faulted in by every thread of the pool at once
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (!packs(arrays[i])) {
      out.push_back(arrays[i]);
      continue;
    }
    char* d = base + at[i];
    // MLX's CPU buffers carry their size in front of the data (Buffer::raw_ptr() skips it): write one, and
    // check that this MLX reads its buffers that way before handing it the memory
    *reinterpret_cast<size_t*>(d - sizeof(size_t)) = arrays[i].nbytes();
    mx::allocator::Buffer buf(d - sizeof(size_t));
    if (buf.raw_ptr() != d) return arrays;  // (the mapping goes with `mapping`)
    const char* src = arrays[i].data<char>();
    for (size_t o = 0; o < arrays[i].nbytes(); o += kHuge)
      pieces.push_back({d + o, src + o, std::min(kHuge, arrays[i].nbytes() - o)});
    out.emplace_back(mx::allocator::Data(buf, [mapping](mx::allocator::Buffer) {}), arrays[i].shape(), arrays[i].dtype());
  }
  pool().run((int64_t)pieces.size(), [&](int64_t c) { std::memcpy(pieces[c].dst, pieces[c].src, pieces[c].n); }, false);
  return out;
}

#include "attention.h"
#include "fused_linear.h"
#include "bf16_gemm.h"
#include "f32_panel.h"
#include "tiled_matmul.h"

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "mlx-openelm CPU kernels (decode-shaped float32 and 4/8-bit affine quantized products)";
  m.attr("mlx_version") = MLX_BUILT_VERSION;
  m.def("gemv", &gemv, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x[..., K] @ w[N, K].T in float32 on the CPU");
  m.def("qgemv", &qgemv, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a, nb::kw_only(),
        "stream"_a = nb::none(), "x[..., K] @ dequantize(w, scales, biases).T (MLX affine layout) on the CPU");
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a, nb::kw_only(),
        "stream"_a = nb::none(), "float32 scale * q + bias of MLX's affine layout, on the CPU");
  m.def("cached_attention", &cached_attention, "qkv"_a, "q_norm"_a.none(), "k_norm"_a.none(), "k_cache"_a,
        "v_cache"_a, "offset"_a, "n_heads"_a, "n_kv_heads"_a, "rope_base"_a, "eps"_a, "scale"_a, nb::kw_only(),
        "owned"_a = false, "stream"_a = nb::none(),
        "OpenELM attention after the qkv projection: q/k RMSNorm, RoPE, cache write at offset (in place), "
        "causal GQA softmax attention; returns (attention [B, L, H * D], k_cache, v_cache)");
  m.def("fused_linear", &fused_linear, "x"_a, "w"_a, "scales"_a.none(), "biases"_a.none(), "group_size"_a, "bits"_a,
        "prologue"_a, "norm_weight"_a.none(), "eps"_a, "residual"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
        "prologue(x) @ w.T (+ residual) for <= 8 rows on the CPU; prologue none, rms_norm or swiglu");
  m.def("tiled_matmul", &tiled_matmul, "x"_a, "w"_a, "scales"_a.none(), "biases"_a.none(), "group_size"_a, "bits"_a,
        nb::kw_only(), "bf16_inputs"_a = false, "stream"_a = nb::none(),
        "x @ w.T for many rows: half or 4/8-bit w widened a tile at a time into the process's cblas_sgemm (float32 w "
        "read in place); "
        "bf16_inputs: x rounded to bfloat16 (bfloat16/4/8-bit w; AVX-512 BF16 dots where built)");
  m.def("tiled_swiglu", &tiled_swiglu, "x"_a, "w"_a, "scales"_a.none(), "biases"_a.none(), "group_size"_a, "bits"_a,
        nb::kw_only(), "bf16_inputs"_a = false, "stream"_a = nb::none(),
        "silu(x @ w[:H].T) * (x @ w[H:].T) for many rows, a tile of hidden units at a time (inference)");
  m.def("has_bf16_dot", &has_bf16_dot, "Whether bfloat16-input prompt products use AVX-512 BF16 dots (built in)");
  m.def("set_bf16_dot", &set_bf16_dot, "on"_a,
        "Use the AVX-512 BF16 dots where they apply (default on; off: rounded x, float32 path); returns the previous setting");
  m.def("set_pooled_tiles", &set_pooled_tiles, "on"_a,
        "Prompt tiles on the extension's threads, one single-threaded OpenBLAS sgemm each (default on where the "
        "BLAS is OpenBLAS; off: each tile split by the BLAS's own threads); read as a product runs; returns the "
        "previous setting");
  m.def("set_f32_panel", &set_f32_panel, "on"_a,
        "Prompt products of half/4/8-bit weights with float32 inputs by the extension's AVX-512 panel kernel (default "
        "on where built; off: widened tiles into sgemm); read as a product runs; returns the previous setting");
  m.def("has_f32_panel", &has_f32_panel, "Whether the AVX-512 float32 panel kernel is built in");
  m.def("f32_panel_on", [] { return has_f32_panel() && g_f32_panel.load(); }, "Whether the panel kernel runs now");
  m.def("pooled_tiles", &pooled_tiles_apply, "Whether prompt tiles run now as one single-threaded sgemm per extension thread");
  m.def("has_blas", &has_blas, "Whether a cblas_sgemm is visible in the process (for tiled_matmul)");
  m.def("to_float32", &to_float32, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "float16/bfloat16 -> float32 on the CPU, multi-threaded");
  m.def("huge_page_pack", &huge_page_pack, "arrays"_a,
        "Copies of evaluated row-contiguous arrays, packed into one mapping advised for 2 MB pages");
  m.def("huge_page_bytes", [] { return g_huge_bytes.load(); }, "Bytes mapped by huge_page_pack now");
  m.def("set_threads", &set_threads, "n"_a, "Threads for the next products (0: one per available core)");
  m.def("num_threads", &num_threads);
  m.def("has_vnni", &has_vnni, "Whether one-row 4-bit products can use AVX-512 VNNI integer dots (built in)");
  m.def("set_vnni", &set_vnni, "on"_a, "Use the VNNI path where it applies (default on); returns the previous setting");
  m.def("cache_copies", [] { return (int64_t)g_cache_copies.load(); },
        "How many times cached_attention copied a cache instead of writing into it");
}
