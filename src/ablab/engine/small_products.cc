// Per-seed products of small dense kernels, seeds as the batch (an XLA FFI handler, CPU).
//
// Built by ablab/engine/small_products.py (with the machine's C++ compiler, on first use) and
// called from the engine's programs by ablab/engine/lowering.py ("small"). For S seeds:
//   mode 0:  C[s] = A[s] @ B[s]      A (S, M, K), B (S, K, N)   a layer's forward product
//   mode 1:  C[s] = A[s] @ B[s]^T    A (S, M, K), B (S, N, K)   its input gradient
//   mode 2:  C[s] = A[s]^T @ B[s]    A (S, K, M), B (S, K, N)   its kernel gradient
// with C (S, M, N), float32, N <= 16 (one vector of 16 lanes holds an output row); A may also
// be one (M, K) / (K, M) matrix every seed shares (a first layer's data). Each sum
// runs over k in increasing order, one fused multiply-add per term where the build has FMA
// (AblabSmallProductsFusedMultiplyAdd says; else a rounded product, then the add). XLA's CPU
// backend runs these thousands of tiny products (K, N of 8 or 12) on its GEMM library at ~15
// GFLOP/s; here a seed's operands stay in registers (issue 17).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

// An output row of N floats is one vector: of 8 lanes where N <= 8 (a CPU that runs 512-bit
// operations as two 256-bit halves, as AMD's Zen 4, does twice the 8-lane multiply-adds a
// cycle), else of 16. The lanes compute the same arithmetic either way. N is a run-time
// width (a lane mask): the code is instantiated per vector type, not per width.
template <typename V>
constexpr int kWidth = sizeof(V) / sizeof(float);

// The first n floats at p in a vector, the other lanes zero.
template <typename V>
inline V load_row(const float* p, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (kWidth<V> == 8)
    return (v8)_mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1u), p);
  else
    return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  V row = {};
  for (int64_t j = 0; j < n; ++j) row[j] = p[j];
  return row;
#endif
}

// The first n lanes of row to p.
template <typename V>
inline void store_row(float* p, V row, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (kWidth<V> == 8)
    _mm256_mask_storeu_ps(p, (__mmask8)((1u << n) - 1u), (__m256)row);
  else
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)row);
#else
  std::memcpy(p, &row, sizeof(float) * n);
#endif
}

// Rows [0, R) of C (., N) = A (., K) @ T, T a (K, lanes) tile zero past lane N, A row-major:
// R independent chains of multiply-adds (R a constant: the accumulators stay in registers).
template <typename V, int R>
inline void times_tile_rows(const float* __restrict a, const V* __restrict t,
                            float* __restrict c, int64_t K, int64_t N) {
  V acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const V b = t[k];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += a[r * K + k] * b;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) store_row<V>(c + r * N, acc[r], N);
}

// Rows [0, R) of C (., N) = A^T B, A (Rows, lda), B (Rows, N): C's row r sums over A's column
// r; B's rows loaded as they lie.
template <typename V, int R>
inline void transposed_times_rows(const float* __restrict a, const float* __restrict b,
                                  float* __restrict c, int64_t rows, int64_t lda, int64_t N) {
  V acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t i = 0; i < rows; ++i) {
    const V bi = load_row<V>(b + i * N, N);
    const float* ai = a + i * lda;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += ai[r] * bi;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) store_row<V>(c + r * N, acc[r], N);
}

constexpr int kBlock = 8;  // output rows a pass: 8 chains hide the multiply-add's latency

// C (M, N) = A (M, K) @ T: kBlock output rows at a time, then the rest in one pass.
template <typename V>
inline void times_tile(const float* __restrict a, const V* __restrict t, float* __restrict c,
                       int64_t M, int64_t K, int64_t N) {
  int64_t i = 0;
  for (; i + kBlock <= M; i += kBlock)
    times_tile_rows<V, kBlock>(a + i * K, t, c + i * N, K, N);
  const float* ai = a + i * K;
  float* ci = c + i * N;
  switch (M - i) {
#define ABLAB_ROWS(r)                            \
  case r:                                        \
    times_tile_rows<V, r>(ai, t, ci, K, N);      \
    break;
    ABLAB_ROWS(7) ABLAB_ROWS(6) ABLAB_ROWS(5) ABLAB_ROWS(4) ABLAB_ROWS(3) ABLAB_ROWS(2)
    ABLAB_ROWS(1)
#undef ABLAB_ROWS
    default: break;
  }
}

// C (M, N) = A^T B, A (R, M), B (R, N): up to 16 output rows in one pass over B (a small
// kernel's gradient: M is its inputs), more in passes of kBlock.
template <typename V>
inline void transposed_times(const float* __restrict a, const float* __restrict b,
                             float* __restrict c, int64_t R, int64_t M, int64_t N) {
  int64_t m = 0;
  if (M > kLanes)
    for (; m + kBlock <= M; m += kBlock)
      transposed_times_rows<V, kBlock>(a + m, b, c + m * N, R, M, N);
  const float* am = a + m;
  float* cm = c + m * N;
  switch (M - m) {
#define ABLAB_ROWS(r)                                  \
  case r:                                              \
    transposed_times_rows<V, r>(am, b, cm, R, M, N);   \
    break;
    ABLAB_ROWS(16) ABLAB_ROWS(15) ABLAB_ROWS(14) ABLAB_ROWS(13) ABLAB_ROWS(12) ABLAB_ROWS(11)
    ABLAB_ROWS(10) ABLAB_ROWS(9) ABLAB_ROWS(8) ABLAB_ROWS(7) ABLAB_ROWS(6) ABLAB_ROWS(5)
    ABLAB_ROWS(4) ABLAB_ROWS(3) ABLAB_ROWS(2) ABLAB_ROWS(1)
#undef ABLAB_ROWS
    default: break;
  }
}

// a_stride: A's size per seed, or 0 when every seed shares one A (a first layer's data)
template <typename V>
void products(int64_t mode, const float* A, const float* B, float* C, int64_t S, int64_t M,
              int64_t K, int64_t N, int64_t a_stride) {
  if (mode == 2) {
    for (int64_t s = 0; s < S; ++s)
      transposed_times<V>(A + s * a_stride, B + s * K * N, C + s * M * N, K, M, N);
    return;
  }
  std::vector<V> tile(K > 0 ? K : 1);
  for (int64_t s = 0; s < S; ++s) {
    const float* b = B + s * K * N;
    for (int64_t k = 0; k < K; ++k) {
      if (mode == 1) {  // B (N, K): column k of it
        V row = {};
        for (int64_t j = 0; j < N; ++j) row[j] = b[j * K + k];
        tile[k] = row;
      } else {
        tile[k] = load_row<V>(b + k * N, N);
      }
    }
    times_tile<V>(A + s * a_stride, tile.data(), C + s * M * N, M, K, N);
  }
}

ffi::Error Impl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                int64_t mode) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  // A (S, ., .) per seed, or (., .) shared by every seed
  if ((ad.size() != 3 && ad.size() != 2) || bd.size() != 3 || cd.size() != 3 || mode < 0 ||
      mode > 2)
    return ffi::Error::InvalidArgument("ablab small products: operand ranks, or mode not 0-2");
  const bool shared = ad.size() == 2;
  const int64_t a0 = ad[ad.size() - 2], a1 = ad[ad.size() - 1];
  const int64_t S = cd[0], M = cd[1], N = cd[2];
  const int64_t K = mode == 2 ? a0 : a1;
  bool fits = (shared || ad[0] == S) && bd[0] == S && N >= 1 && N <= kLanes;
  if (mode == 0) fits = fits && a0 == M && bd[1] == K && bd[2] == N;
  if (mode == 1) fits = fits && a0 == M && bd[1] == N && bd[2] == K;
  if (mode == 2) fits = fits && a1 == M && bd[1] == K && bd[2] == N;
  if (!fits) return ffi::Error::InvalidArgument("ablab small products: shapes do not match");
  auto run = N <= 8 ? products<v8> : products<v16>;
  run(mode, a.typed_data(), b.typed_data(), c->typed_data(), S, M, K, N, shared ? 0 : a0 * a1);
  return ffi::Error::Success();
}

// Keras' Adam update of one variable for S seeds in one pass (keras.optimizers.Adam.update_step
// without amsgrad): per element, in Keras' order of operations,
//   m' = m + (g - m) * c1;  v' = v + (g * g - v) * c2;  p' = p - (m' * alpha) / (sqrt(v') + eps)
// g, m, v, p: (S, n); alpha: (S,) (lr * sqrt(1 - beta_2^t) / (1 - beta_1^t), per seed).
// XLA runs this as three loops per variable over arrays that, at the engine's cell sizes, live
// in L3; one pass reads each array once.
ffi::Error AdamImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> alpha,
                    ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out,
                    ffi::ResultBuffer<ffi::F32> p_out, float c1, float c2, float eps) {
  auto gd = g.dimensions();
  if (gd.size() != 2 || alpha.dimensions().size() != 1 || alpha.dimensions()[0] != gd[0])
    return ffi::Error::InvalidArgument("ablab adam: g (seeds, n) and alpha (seeds,)");
  for (auto dims : {m.dimensions(), v.dimensions(), p.dimensions(), m_out->dimensions(),
                    v_out->dimensions(), p_out->dimensions()}) {
    if (dims.size() != 2 || dims[0] != gd[0] || dims[1] != gd[1])
      return ffi::Error::InvalidArgument("ablab adam: every array (seeds, n)");
  }
  const int64_t S = gd[0], n = gd[1];
  const float* G = g.typed_data();
  const float* M = m.typed_data();
  const float* V = v.typed_data();
  const float* P = p.typed_data();
  const float* A = alpha.typed_data();
  float* MO = m_out->typed_data();
  float* VO = v_out->typed_data();
  float* PO = p_out->typed_data();
  for (int64_t s = 0; s < S; ++s) {
    const float a = A[s];
    const int64_t o = s * n;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const float gi = G[o + i];
      const float mi = M[o + i] + (gi - M[o + i]) * c1;
      const float vi = V[o + i] + (gi * gi - V[o + i]) * c2;
      MO[o + i] = mi;
      VO[o + i] = vi;
      PO[o + i] = P[o + i] - (mi * a) / (std::sqrt(vi) + eps);
    }
  }
  return ffi::Error::Success();
}

// x (.., H, W, C) and y / first (.., OH, OW, C) with the same leading axes (N: their
// product), windows of PH x PW (at most 255 elements: an offset is a byte) that fit.
template <typename D>
bool pool_shapes(D xd, D yd, D fd, int64_t ph, int64_t pw, int64_t& N, int64_t& H, int64_t& W,
                 int64_t& C, int64_t& OH, int64_t& OW) {
  const size_t r = xd.size();
  if (r < 3 || yd.size() != r || fd.size() != r || ph < 1 || pw < 1 || ph * pw > 255)
    return false;
  N = 1;
  for (size_t i = 0; i + 3 < r; ++i) {
    if (yd[i] != xd[i] || fd[i] != xd[i]) return false;
    N *= xd[i];
  }
  H = xd[r - 3], W = xd[r - 2], C = xd[r - 1], OH = yd[r - 3], OW = yd[r - 2];
  for (size_t i = r - 3; i < r; ++i)
    if (fd[i] != yd[i]) return false;
  return yd[r - 1] == C && OH * ph <= H && OW * pw <= W;
}

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

// XLA's maximum, as reduce_window's max computes it (LLVM's maximum): a NaN wins and the first
// NaN is kept; +0 is greater than -0 (the bits of two equal values and-ed: +0 where either is
// +0, the same value otherwise).
inline v8 xla_max(v8 m, v8 v) {
  const v8 both = (v8)((v8i)m & (v8i)v);
  const v8 larger = v > m ? v : (v == m ? both : m);
  return m != m ? m : (v != v ? v : larger);
}

inline float xla_max(float m, float v) {
  if (m != m) return m;
  if (v != v) return v;
  if (v > m) return v;
  if (v == m) {
    uint32_t a, b;
    std::memcpy(&a, &m, sizeof a);
    std::memcpy(&b, &v, sizeof b);
    a &= b;
    std::memcpy(&m, &a, sizeof m);
  }
  return m;
}

// Max pooling over windows that tile a channels-last input (stride = pool size), per window
// element over the channels: x (.., H, W, C) -> y (.., OH, OW, C), the maximum (xla_max over
// the window in row-major order: its bits are reduce_window's), and per output the offset
// inside its window (row-major) that reduce_window's gradient (select_and_scatter with >=)
// sends the gradient to: the window's elements in order, the selected one replaced by the next
// unless selected >= next -- the first maximum (NaN-free windows). Rows and columns past
// OH * PH / OW * PW are not read.
ffi::Error MaxPoolImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> first, int64_t ph, int64_t pw) {
  int64_t N, H, W, C, OH, OW;
  if (!pool_shapes(x.dimensions(), y->dimensions(), first->dimensions(), ph, pw, N, H, W, C, OH,
                   OW))
    return ffi::Error::InvalidArgument("ablab max pool: x (.., H, W, C), y (.., OH, OW, C)");
  const float* X = x.typed_data();
  float* Y = y->typed_data();
  uint8_t* F = first->typed_data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < OH; ++i)
      for (int64_t j = 0; j < OW; ++j) {
        const int64_t o = ((n * OH + i) * OW + j) * C;
        const float* x0 = X + ((n * H + i * ph) * W + j * pw) * C;
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) {  // 8 channels a vector
          v8 m, sel;
          std::memcpy(&m, x0 + c, sizeof m);
          sel = m;
          v8i k = {};
          for (int64_t a = 0; a < ph; ++a)
            for (int64_t b = a == 0 ? 1 : 0; b < pw; ++b) {
              v8 v;
              std::memcpy(&v, x0 + (a * W + b) * C + c, sizeof v);
              m = xla_max(m, v);
              const v8i keep = sel >= v;
              sel = keep ? sel : v;
              k = keep ? k : (v8i{} + static_cast<int32_t>(a * pw + b));
            }
          std::memcpy(Y + o + c, &m, sizeof m);
          const v8b kb = __builtin_convertvector(k, v8b);
          std::memcpy(F + o + c, &kb, sizeof kb);
        }
        for (; c < C; ++c) {  // the rest one at a time, the same arithmetic
          float m = x0[c], sel = m;
          uint8_t k = 0;
          for (int64_t a = 0; a < ph; ++a)
            for (int64_t b = a == 0 ? 1 : 0; b < pw; ++b) {
              const float v = x0[(a * W + b) * C + c];
              m = xla_max(m, v);
              if (!(sel >= v)) {
                sel = v;
                k = static_cast<uint8_t>(a * pw + b);
              }
            }
          Y[o + c] = m;
          F[o + c] = k;
        }
      }
  return ffi::Error::Success();
}

// The gradient of MaxPoolImpl: g (.., OH, OW, C) to each window's first maximum, zero
// elsewhere (the rows and columns no window covers included): dx (.., H, W, C).
ffi::Error MaxPoolGradImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U8> first,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t ph, int64_t pw) {
  int64_t N, H, W, C, OH, OW;
  if (!pool_shapes(dx->dimensions(), g.dimensions(), first.dimensions(), ph, pw, N, H, W, C, OH,
                   OW))
    return ffi::Error::InvalidArgument("ablab max pool grad: g (.., OH, OW, C), dx (.., H, W, C)");
  const float* G = g.typed_data();
  const uint8_t* F = first.typed_data();
  float* D = dx->typed_data();
  for (int64_t n = 0; n < N; ++n) {
    float* dn = D + n * H * W * C;
    if (OH * ph < H || OW * pw < W) std::memset(dn, 0, sizeof(float) * H * W * C);
    for (int64_t i = 0; i < OH; ++i)
      for (int64_t j = 0; j < OW; ++j) {
        const int64_t o = ((n * OH + i) * OW + j) * C;
        float* d0 = dn + ((i * ph) * W + j * pw) * C;
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) {
          v8 gv;
          std::memcpy(&gv, G + o + c, sizeof gv);
          v8b kb;
          std::memcpy(&kb, F + o + c, sizeof kb);
          const v8i k = __builtin_convertvector(kb, v8i);
          for (int64_t a = 0; a < ph; ++a)
            for (int64_t b = 0; b < pw; ++b) {
              const v8 d = (k == static_cast<int32_t>(a * pw + b)) ? gv : v8{};
              std::memcpy(d0 + (a * W + b) * C + c, &d, sizeof d);
            }
        }
        for (; c < C; ++c)
          for (int64_t a = 0; a < ph; ++a)
            for (int64_t b = 0; b < pw; ++b)
              d0[(a * W + b) * C + c] = F[o + c] == a * pw + b ? G[o + c] : 0.0f;
      }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AblabAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("c1")
                                  .Attr<float>("c2")
                                  .Attr<float>("eps"));

// 1 where each term is added with a fused multiply-add (the numerics of this build: a CPU
// without FMA, or a portable build for one, rounds each product first).
extern "C" int AblabSmallProductsFusedMultiplyAdd() {
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AblabSmallProducts, Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AblabMaxPool, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AblabMaxPoolGrad, MaxPoolGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
