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
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// The first N floats at p in a vector, the other lanes zero.
template <int N>
inline v16 load_row(const float* p) {
#ifdef __AVX512F__
  return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << N) - 1u), p);
#else
  v16 row = {};
  for (int j = 0; j < N; ++j) row[j] = p[j];
  return row;
#endif
}

// The first N lanes of row to p.
template <int N>
inline void store_row(float* p, v16 row) {
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << N) - 1u), (__m512)row);
#else
  std::memcpy(p, &row, sizeof(float) * N);
#endif
}

// C (M, N) = A (M, K) @ T, T a (K, 16) tile zero past lane N, A row-major.
// Four output rows at a time: four independent chains of multiply-adds.
template <int N>
inline void times_tile(const float* __restrict a, const v16* __restrict t, float* __restrict c,
                       int64_t M, int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    v16 c0 = {}, c1 = {}, c2 = {}, c3 = {};
    const float* ai = a + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const v16 b = t[k];
      c0 += ai[k] * b;
      c1 += ai[K + k] * b;
      c2 += ai[2 * K + k] * b;
      c3 += ai[3 * K + k] * b;
    }
    store_row<N>(c + (i + 0) * N, c0);
    store_row<N>(c + (i + 1) * N, c1);
    store_row<N>(c + (i + 2) * N, c2);
    store_row<N>(c + (i + 3) * N, c3);
  }
  for (; i < M; ++i) {
    v16 c0 = {};
    for (int64_t k = 0; k < K; ++k) c0 += a[i * K + k] * t[k];
    store_row<N>(c + i * N, c0);
  }
}

// C (M, N) = A^T B, A (R, M), B (R, N): B's rows loaded as they lie, four output rows at a time.
template <int N>
inline void transposed_times(const float* __restrict a, const float* __restrict b,
                             float* __restrict c, int64_t R, int64_t M) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    v16 c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (int64_t r = 0; r < R; ++r) {
      const v16 br = load_row<N>(b + r * N);
      const float* ar = a + r * M + m;
      c0 += ar[0] * br;
      c1 += ar[1] * br;
      c2 += ar[2] * br;
      c3 += ar[3] * br;
    }
    store_row<N>(c + (m + 0) * N, c0);
    store_row<N>(c + (m + 1) * N, c1);
    store_row<N>(c + (m + 2) * N, c2);
    store_row<N>(c + (m + 3) * N, c3);
  }
  for (; m < M; ++m) {
    v16 c0 = {};
    for (int64_t r = 0; r < R; ++r) c0 += a[r * M + m] * load_row<N>(b + r * N);
    store_row<N>(c + m * N, c0);
  }
}

// a_stride: A's size per seed, or 0 when every seed shares one A (a first layer's data)
template <int N>
void products(int64_t mode, const float* A, const float* B, float* C, int64_t S, int64_t M,
              int64_t K, int64_t a_stride) {
  if (mode == 2) {
    for (int64_t s = 0; s < S; ++s)
      transposed_times<N>(A + s * a_stride, B + s * K * N, C + s * M * N, K, M);
    return;
  }
  std::vector<v16> tile(K > 0 ? K : 1);
  for (int64_t s = 0; s < S; ++s) {
    const float* b = B + s * K * N;
    for (int64_t k = 0; k < K; ++k) {
      if (mode == 1) {  // B (N, K): column k of it
        v16 row = {};
        for (int j = 0; j < N; ++j) row[j] = b[j * K + k];
        tile[k] = row;
      } else {
        tile[k] = load_row<N>(b + k * N);
      }
    }
    times_tile<N>(A + s * a_stride, tile.data(), C + s * M * N, M, K);
  }
}

typedef void (*products_t)(int64_t, const float*, const float*, float*, int64_t, int64_t,
                           int64_t, int64_t);

template <int... I>
constexpr std::array<products_t, kLanes> table(std::integer_sequence<int, I...>) {
  return {products<I + 1>...};
}

const std::array<products_t, kLanes> kProducts = table(std::make_integer_sequence<int, kLanes>{});

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
  kProducts[N - 1](mode, a.typed_data(), b.typed_data(), c->typed_data(), S, M, K,
                   shared ? 0 : a0 * a1);
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
