// Device building blocks shared by the forward and backward kernels.
//
// A thread block (128 threads, 4 warps) owns one 64 x 64 tile of the similarity matrix at a
// time. The tile S = za[rows] . zc[cols]^T is computed over the full feature dimension in chunks
// of 32 features, written to shared memory as float32, and then read element-wise by the
// kernel's epilogue (online log-sum-exp in the forward, probabilities in the backward).
// Operands arrive as float32 rows; they are converted to the tile type T while being stored in
// shared memory:
//   T = float:                    SIMT fp32 FMAs, each thread owns 8 x 4 outputs (no TF32);
//   T = __half / __nv_bfloat16:   WMMA m16n16k16 on tensor cores with fp32 accumulators, each
//                                 warp owns a 32 x 32 quarter of the tile.
// Rows and features past the end are stored as zeros, so partial tiles need no special case
// in the products; the epilogues mask them.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "clreg.h"

namespace clreg {
namespace tiles {

constexpr int kKChunk = 32;  // features per step of the score product

template <typename T>
struct Layout {
  static constexpr bool kSimt = std::is_same<T, float>::value;
  // Leading dimensions (elements). SIMT: odd strides keep the column reads free of bank
  // conflicts. WMMA: multiples of 8 (16-byte rows) as load_matrix_sync requires, padded off 32
  // banks; every 16-row fragment offset stays 32-byte aligned.
  static constexpr int kOpLd = kSimt ? kKChunk + 1 : kKChunk + 8;  // score operands [64][kOpLd]
  static constexpr int kProdLd = kSimt ? kTile + 1 : kTile + 8;    // product operand, G tile
  static constexpr int kSLd = kSimt ? kTile + 1 : kTile + 4;       // float scores [64][kSLd]

  static constexpr int align(int bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr int kScoreOpBytes = 2 * kTile * kOpLd * (int)sizeof(T);
  static constexpr int kProdOpBytes = kTile * kProdLd * (int)sizeof(T);
  // The score operands and the product operand are never live at the same time: one region.
  static constexpr int kOpBytes = align(kScoreOpBytes > kProdOpBytes ? kScoreOpBytes : kProdOpBytes);
  static constexpr int kSBytes = align(kTile * kSLd * 4);
  // The SIMT path rewrites the scores into probabilities in place (same type, same stride).
  static constexpr int kGBytes = kSimt ? 0 : align(kTile * kProdLd * (int)sizeof(T));
  static constexpr int kVecBytes = align(2 * kTile * 4);
  static constexpr int kTotalBytes = kOpBytes + kSBytes + kGBytes + kVecBytes;
  static_assert(!kSimt || kSLd == kProdLd, "SIMT path computes G in place of S");
  static_assert(kTotalBytes <= 48 * 1024, "static shared memory limit");
};

// Pointers into one block's shared memory.
template <typename T>
struct Smem {
  using L = Layout<T>;
  T* op_a;    // [64][kOpLd] anchor-side score operand
  T* op_b;    // [64][kOpLd] column-side score operand
  T* prod;    // [64][kProdLd] operand of the gradient product (aliases op_a/op_b)
  float* s;   // [64][kSLd] scores
  T* g;       // [64][kProdLd] probabilities (aliases s on the SIMT path)
  float* vec_lse;  // [64]
  float* vec_w;    // [64]

  __device__ explicit Smem(unsigned char* raw) {
    op_a = reinterpret_cast<T*>(raw);
    op_b = op_a + kTile * L::kOpLd;
    prod = reinterpret_cast<T*>(raw);
    s = reinterpret_cast<float*>(raw + L::kOpBytes);
    g = L::kSimt ? reinterpret_cast<T*>(s)
                 : reinterpret_cast<T*>(raw + L::kOpBytes + L::kSBytes);
    vec_lse = reinterpret_cast<float*>(raw + L::kOpBytes + L::kSBytes + L::kGBytes);
    vec_w = vec_lse + kTile;
  }
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// dst[r][k] = src[row0 + r][k0 + k] for r < 64, k < K_WIDTH, rounded to T; zero past n_rows or dim.
template <typename T, int K_WIDTH, int LD>
__device__ __forceinline__ void load_rows(const float* __restrict__ src, int64_t row0,
                                          int64_t n_rows, int64_t dim, int64_t k0, T* dst) {
  constexpr int kPerThread = kTile * K_WIDTH / kThreads;
  static_assert(kTile * K_WIDTH % (4 * kThreads) == 0, "whole loads per thread");
  if (dim % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    // 16-byte loads: with dim and k0 multiples of 4, a group of 4 features is either wholly
    // inside the row or wholly past its end, and every group starts 16-byte aligned.
    constexpr int kGroups = K_WIDTH / 4;
#pragma unroll 2
    for (int it = 0; it < kPerThread / 4; ++it) {
      const int e = threadIdx.x + it * kThreads;
      const int r = e / kGroups;
      const int k = (e % kGroups) * 4;
      const int64_t row = row0 + r;
      const int64_t col = k0 + k;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < n_rows && col < dim) v = __ldg(reinterpret_cast<const float4*>(src + row * dim + col));
      T* out = dst + r * LD + k;
      out[0] = from_float<T>(v.x);
      out[1] = from_float<T>(v.y);
      out[2] = from_float<T>(v.z);
      out[3] = from_float<T>(v.w);
    }
    return;
  }
#pragma unroll 4
  for (int it = 0; it < kPerThread; ++it) {
    const int e = threadIdx.x + it * kThreads;
    const int r = e / K_WIDTH;  // consecutive threads read consecutive features
    const int k = e % K_WIDTH;
    const int64_t row = row0 + r;
    const int64_t col = k0 + k;
    float v = 0.f;
    if (row < n_rows && col < dim) v = __ldg(src + row * dim + col);
    dst[r * LD + k] = from_float<T>(v);
  }
}

// acc[i][j] += sum_k A(m, k) B(k, n) for the thread's outputs m = ty + 8 i, n = tx + 16 j, with
// A(m, k) = a[m * A_SM + k * A_SK] and B(k, n) = b[k * B_SK + n * B_SN] in shared memory.
template <int A_SM, int A_SK, int B_SK, int B_SN, int K_LEN>
__device__ __forceinline__ void simt_fma(float (&acc)[8][4], const float* a, const float* b) {
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
#pragma unroll 4
  for (int k = 0; k < K_LEN; ++k) {
    float av[8], bv[4];
#pragma unroll
    for (int i = 0; i < 8; ++i) av[i] = a[(ty + 8 * i) * A_SM + k * A_SK];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k * B_SK + (tx + 16 * j) * B_SN];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

// sm.s[m][n] = za[row0 + m] . zc[col0 + n] over all dim features (0 for rows/columns past the
// end). Ends with a barrier: the operand region is free again and sm.s is visible to all.
template <typename T>
__device__ void compute_scores(const float* __restrict__ za, const float* __restrict__ zc,
                               int64_t row0, int64_t col0, int64_t n_anchor, int64_t n_col,
                               int64_t dim, const Smem<T>& sm) {
  using L = Layout<T>;
  if constexpr (L::kSimt) {
    float acc[8][4] = {};
    for (int64_t k0 = 0; k0 < dim; k0 += kKChunk) {
      load_rows<T, kKChunk, L::kOpLd>(za, row0, n_anchor, dim, k0, sm.op_a);
      load_rows<T, kKChunk, L::kOpLd>(zc, col0, n_col, dim, k0, sm.op_b);
      __syncthreads();
      simt_fma<L::kOpLd, 1, 1, L::kOpLd, kKChunk>(acc, sm.op_a, sm.op_b);
      __syncthreads();
    }
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sm.s[(ty + 8 * i) * L::kSLd + tx + 16 * j] = acc[i][j];
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32;  // this warp's 32 x 32 quarter of the tile
    const int wn = (warp & 1) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);
    for (int64_t k0 = 0; k0 < dim; k0 += kKChunk) {
      load_rows<T, kKChunk, L::kOpLd>(za, row0, n_anchor, dim, k0, sm.op_a);
      load_rows<T, kKChunk, L::kOpLd>(zc, col0, n_col, dim, k0, sm.op_b);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kKChunk; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        // B(k, n) = zc[n][k]: the column operand stored row-wise is B in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int a = 0; a < 2; ++a)
          wmma::load_matrix_sync(fa[a], sm.op_a + (wm + 16 * a) * L::kOpLd + k, L::kOpLd);
#pragma unroll
        for (int b = 0; b < 2; ++b)
          wmma::load_matrix_sync(fb[b], sm.op_b + (wn + 16 * b) * L::kOpLd + k, L::kOpLd);
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::store_matrix_sync(sm.s + (wm + 16 * a) * L::kSLd + wn + 16 * b, acc[a][b], L::kSLd,
                                wmma::mem_row_major);
  }
  __syncthreads();
}

// out[m][p] += sum_k G(m, k) src[src_row0 + k][p] for the 64 x dim_pad block `out` (row stride
// ld_out, float32, in a padded global workspace that only this block writes). G is sm.g, read
// as stored ([m][k]) or, with TRANSPOSE_G, as its transpose (sm.g holds [k][m]). The src rows
// travel through shared memory 64 features at a time, rounded to T.
template <typename T, bool TRANSPOSE_G>
__device__ void accumulate_product(const float* __restrict__ src, int64_t src_row0,
                                   int64_t src_rows, int64_t dim, const Smem<T>& sm,
                                   float* __restrict__ out, int64_t ld_out) {
  using L = Layout<T>;
  for (int64_t p0 = 0; p0 < dim; p0 += kTile) {
    load_rows<T, kTile, L::kProdLd>(src, src_row0, src_rows, dim, p0, sm.prod);
    __syncthreads();
    if constexpr (L::kSimt) {
      const int tx = threadIdx.x & 15;
      const int ty = threadIdx.x >> 4;
      float acc[8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = out[(ty + 8 * i) * ld_out + p0 + tx + 16 * j];
      if constexpr (TRANSPOSE_G)
        simt_fma<1, L::kProdLd, L::kProdLd, 1, kTile>(acc, sm.g, sm.prod);
      else
        simt_fma<L::kProdLd, 1, L::kProdLd, 1, kTile>(acc, sm.g, sm.prod);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) out[(ty + 8 * i) * ld_out + p0 + tx + 16 * j] = acc[i][j];
    } else {
      using namespace nvcuda;
      using ALayout = typename std::conditional<TRANSPOSE_G, wmma::col_major, wmma::row_major>::type;
      const int warp = threadIdx.x >> 5;
      const int wm = (warp >> 1) * 32;
      const int wn = (warp & 1) * 32;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b)
          wmma::load_matrix_sync(acc[a][b], out + (wm + 16 * a) * ld_out + p0 + wn + 16 * b,
                                 (unsigned)ld_out, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTile; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          // G(m, k): stored at g[m][k], or at g[k][m] when transposed (column-major view).
          const T* g_ptr = TRANSPOSE_G ? sm.g + k * L::kProdLd + wm + 16 * a
                                       : sm.g + (wm + 16 * a) * L::kProdLd + k;
          wmma::load_matrix_sync(fa[a], g_ptr, L::kProdLd);
        }
#pragma unroll
        for (int b = 0; b < 2; ++b)
          wmma::load_matrix_sync(fb[b], sm.prod + k * L::kProdLd + wn + 16 * b, L::kProdLd);
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      }
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b)
          wmma::store_matrix_sync(out + (wm + 16 * a) * ld_out + p0 + wn + 16 * b, acc[a][b],
                                  (unsigned)ld_out, wmma::mem_row_major);
    }
    __syncthreads();  // sm.prod is overwritten by the next chunk
  }
}

}  // namespace tiles
}  // namespace clreg
