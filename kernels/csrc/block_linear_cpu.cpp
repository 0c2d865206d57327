// y = x @ W^T with W kept in its GGUF block format (CPU, float32 arithmetic).
//
//   x       [M, K] float32, contiguous
//   blocks  [N, K / 32, B] uint8: row n of W as consecutive GGML blocks of 32 weights
//   kind    "q4_0" (B = 18: f16 d, 16 bytes of nibbles), "q4_1" (B = 20: f16 d, f16 m, 16 bytes of
//           nibbles) or "q8_0" (B = 34: f16 d, 32 int8)
//   returns [M, N] float32
//
// Each weight is rebuilt in float32 exactly as the GGUF reader dequantizes it: Q4_0
// d * (q - 8), Q4_1 d * q + m, Q8_0 d * q, where the products are exact in float32 (an
// 11-bit significand times a 4- or 8-bit integer), so the weights are bit-identical to the dense float32 tensors;
// only the order of the dot products' additions differs from a dense GEMM. Reading 5 or
// 8.5 bits per weight instead of 32 is the point: decode-sized batches are bound by how
// fast the weights stream from memory. Nibble order within a Q4_0 / Q4_1 block: byte j
// holds weight j in its low half and weight j + 16 in its high half.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace {

constexpr int64_t kBlock = 32;

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// The 32 weights of one block, in float32, as two halves of 16.
struct Weights {
#ifdef __AVX512F__
  __m512 lo, hi;
#else
  float w[kBlock];
#endif
};

inline Weights load_q4_1(const uint8_t* block) {
  const float d = half_to_float(block), m = half_to_float(block + 2);
  Weights out;
#ifdef __AVX512F__
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m512 q_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)));
  const __m512 q_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), mask)));
  // d * q is exact, so a fused multiply-add rounds once, like the reader's multiply then add.
  out.lo = _mm512_fmadd_ps(q_lo, _mm512_set1_ps(d), _mm512_set1_ps(m));
  out.hi = _mm512_fmadd_ps(q_hi, _mm512_set1_ps(d), _mm512_set1_ps(m));
#else
  for (int j = 0; j < 16; ++j) {
    out.w[j] = d * static_cast<float>(block[4 + j] & 0x0F) + m;
    out.w[j + 16] = d * static_cast<float>(block[4 + j] >> 4) + m;
  }
#endif
  return out;
}

inline Weights load_q4_0(const uint8_t* block) {
  const float d = half_to_float(block);
  Weights out;
#ifdef __AVX512F__
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi32(8);
  const __m512i q_lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)), eight);
  const __m512i q_hi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), mask)), eight);
  out.lo = _mm512_mul_ps(_mm512_cvtepi32_ps(q_lo), _mm512_set1_ps(d));
  out.hi = _mm512_mul_ps(_mm512_cvtepi32_ps(q_hi), _mm512_set1_ps(d));
#else
  for (int j = 0; j < 16; ++j) {
    out.w[j] = d * static_cast<float>((block[2 + j] & 0x0F) - 8);
    out.w[j + 16] = d * static_cast<float>((block[2 + j] >> 4) - 8);
  }
#endif
  return out;
}

inline Weights load_q8_0(const uint8_t* block) {
  const float d = half_to_float(block);
  Weights out;
#ifdef __AVX512F__
  const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
  const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18));
  out.lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_set1_ps(d));
  out.hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), _mm512_set1_ps(d));
#else
  for (int j = 0; j < kBlock; ++j) out.w[j] = d * static_cast<float>(static_cast<int8_t>(block[2 + j]));
#endif
  return out;
}

// Rows [row0, row0 + R) of y for output features [n_begin, n_end): R accumulators stay in
// registers while the weights stream past once. K is walked in chunks of at most
// kChunkFloats values per row for kOutTile outputs at a time, so the chunk of x (R rows,
// <= 20 KB) stays in L1 while those outputs' weights stream past (at K = 1536, 8 rows of
// x are 48 KB: read whole for every output they spilled to L2). Between chunks an output's
// accumulators wait in `saved`; each still adds its blocks in order from zero, so y is
// what one pass over K computes, bit for bit.
constexpr int64_t kChunkFloats = 5120;
constexpr int64_t kOutTile = 16;

template <int R, Weights (*Load)(const uint8_t*)>
void tile(const float* x, int64_t K, const uint8_t* blocks, int64_t block_bytes, int64_t N,
          int64_t n_begin, int64_t n_end, int64_t row0, float* y) {
  const int64_t num_blocks = K / kBlock;
  const int64_t most = std::max<int64_t>(1, kChunkFloats / (R * kBlock));
  const int64_t chunks = (num_blocks + most - 1) / most;
  const int64_t chunk = (num_blocks + chunks - 1) / chunks;  // blocks per chunk, even split
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kOutTile) {
    const int64_t n1 = std::min(n_end, n0 + kOutTile);
#ifdef __AVX512F__
    __m512 saved[kOutTile][R];
#else
    float saved[kOutTile][R];
#endif
    for (int64_t b0 = 0; b0 < num_blocks; b0 += chunk) {
      const int64_t b1 = std::min(num_blocks, b0 + chunk);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = blocks + n * num_blocks * block_bytes;
#ifdef __AVX512F__
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = b0 == 0 ? _mm512_setzero_ps() : saved[n - n0][r];
        for (int64_t b = b0; b < b1; ++b) {
          const Weights w = Load(row + b * block_bytes);
          for (int r = 0; r < R; ++r) {
            const float* xr = x + (row0 + r) * K + b * kBlock;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w.lo, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w.hi, acc[r]);
          }
        }
        if (b1 == num_blocks) {
          for (int r = 0; r < R; ++r) y[(row0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
        } else {
          for (int r = 0; r < R; ++r) saved[n - n0][r] = acc[r];
        }
#else
        float acc[R];
        for (int r = 0; r < R; ++r) acc[r] = b0 == 0 ? 0.0f : saved[n - n0][r];
        for (int64_t b = b0; b < b1; ++b) {
          const Weights w = Load(row + b * block_bytes);
          for (int r = 0; r < R; ++r) {
            const float* xr = x + (row0 + r) * K + b * kBlock;
            for (int j = 0; j < kBlock; ++j) acc[r] += xr[j] * w.w[j];
          }
        }
        for (int r = 0; r < R; ++r) {
          if (b1 == num_blocks) y[(row0 + r) * N + n] = acc[r];
          else saved[n - n0][r] = acc[r];
        }
#endif
      }
    }
  }
}

template <Weights (*Load)(const uint8_t*)>
void rows(const float* x, int64_t M, int64_t K, const uint8_t* blocks, int64_t block_bytes, int64_t N,
          int64_t n_begin, int64_t n_end, float* y) {
  constexpr int kTile = 8;
  int64_t row0 = 0;
  for (; row0 + kTile <= M; row0 += kTile)
    tile<kTile, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y);
  switch (M - row0) {
    case 7: tile<7, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 6: tile<6, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 5: tile<5, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 4: tile<4, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 3: tile<3, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 2: tile<2, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    case 1: tile<1, Load>(x, K, blocks, block_bytes, N, n_begin, n_end, row0, y); break;
    default: break;
  }
}

}  // namespace

torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 [N, K / 32, block_bytes] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0), block_bytes = blocks.size(2);
  TORCH_CHECK(K == blocks.size(1) * kBlock, "x has ", K, " features but the blocks hold ", blocks.size(1) * kBlock);
  TORCH_CHECK(kind == "q4_0" || kind == "q4_1" || kind == "q8_0", "block kind must be q4_0, q4_1 or q8_0, got ",
              kind);
  const int64_t expected_bytes = kind == "q4_0" ? 18 : kind == "q4_1" ? 20 : 34;
  TORCH_CHECK(block_bytes == expected_bytes, kind, " blocks are ", expected_bytes, " bytes, got ", block_bytes);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* x_ptr = x.data_ptr<float>();
  const uint8_t* b_ptr = blocks.data_ptr<uint8_t>();
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (kind == "q4_0")
      rows<load_q4_0>(x_ptr, M, K, b_ptr, block_bytes, N, begin, end, y_ptr);
    else if (kind == "q4_1")
      rows<load_q4_1>(x_ptr, M, K, b_ptr, block_bytes, N, begin, end, y_ptr);
    else
      rows<load_q8_0>(x_ptr, M, K, b_ptr, block_bytes, N, begin, end, y_ptr);
  });
  return y;
}
