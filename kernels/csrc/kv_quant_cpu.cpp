// A quantized KV cache on the CPU: int8 or float8_e4m3fn rows with one float16 scale per
// (token, kv-head) row, as kernels/kv_quant.py defines them.
//
//   store_kv_quantized     store_kv_ref with scales: each row quantized with its own scale,
//                          bit-identical to quantize_kv_ref (same float32 operations)
//   decode_quantized       one decoding sequence's attention straight from the stored rows:
//                          with AVX-512 and a head_dim of 32, 64 or 128, the walk of
//                          paged_attention_cpu.cpp's float decode (a KV head's query heads in
//                          registers, each row dequantized once in registers for all of them,
//                          rows prefetched ahead through the block table); otherwise a row is
//                          dequantized into a head_dim buffer once and used by every query
//                          head of its group. Either way a score is (q . row) * the row's scale
//                          and a V row enters the output as (p * its scale) * row.
//   gather_dequantized     a multi-query sequence's context as float32 [len, KVH, D],
//                          bit-identical to the reference's dequantization
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace {

constexpr float kFp16Max = 65504.f;

float qmax_of(c10::ScalarType dtype) { return dtype == torch::kInt8 ? 127.f : 448.f; }

// float of each of the 256 float8_e4m3fn bit patterns (exact).
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table;
}

inline void to_float(const int8_t* q, float* out, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<float>(q[d]);
}

inline void to_float(const c10::Float8_e4m3fn* q, float* out, int64_t n) {
  const auto& table = fp8_table();
  const auto* bits = reinterpret_cast<const uint8_t*>(q);
  for (int64_t d = 0; d < n; ++d) out[d] = table[bits[d]];
}

// One row x[0..dim) quantized into q with its scale s (kv_quant.py's formula).
template <typename T>
void quantize_row(const float* x, int64_t dim, float qmax, T* q, at::Half* s) {
  float amax = 0.f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(x[d]));
  const at::Half half(std::min(amax / qmax, kFp16Max));
  const float step = static_cast<float>(half);
  *s = half;
  for (int64_t d = 0; d < dim; ++d) {
    float v = step > 0.f ? x[d] / step : 0.f;
    v = std::min(std::max(v, -qmax), qmax);
    if constexpr (std::is_same_v<T, int8_t>) {
      q[d] = static_cast<int8_t>(std::trunc(v + (v >= 0.f ? 0.5f : -0.5f)));
    } else {
      q[d] = T(v);
    }
  }
}

template <typename T>
void store_rows(const torch::Tensor& x, torch::Tensor& cache, torch::Tensor& scales, const int64_t* slots) {
  const int64_t tokens = x.size(0), kv_heads = x.size(1), dim = x.size(2);
  const float qmax = qmax_of(cache.scalar_type());
  T* c = reinterpret_cast<T*>(cache.data_ptr());
  at::Half* s = scales.data_ptr<at::Half>();
  const float* base = x.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t h = 0; h < kv_heads; ++h)
      quantize_row(base + t * x.stride(0) + h * x.stride(1), dim, qmax, c + (slots[t] * kv_heads + h) * dim,
                   s + slots[t] * kv_heads + h);
  }
}

// s[0..n) <- softmax(s[0..n)), in place.
void softmax(float* s, int64_t n) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) peak = std::max(peak, s[i]);
  for (int64_t i = 0; i < n; ++i) s[i] -= peak;
  pdserve::exp_array(s, s, n);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += s[i];
  const float inv = 1.f / total;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

template <typename T>
void decode_rows(const float* q, const T* k_cache, const T* v_cache, const at::Half* k_scale,
                 const at::Half* v_scale, const int64_t* table, int64_t len, int64_t block_size, int64_t kv_heads,
                 int64_t group, int64_t dim, float scale, float* out, std::vector<float>& scores) {
  const int64_t heads = kv_heads * group;
  scores.resize(static_cast<size_t>(heads * len));
  std::vector<float> row(static_cast<size_t>(dim));
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      to_float(k_cache + (slot * kv_heads + kv) * dim, row.data(), dim);
      const float row_scale = static_cast<float>(k_scale[slot * kv_heads + kv]) * scale;
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
        const float* qh = q + h * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qh[d] * row[d];
        scores[h * len + pos] = dot * row_scale;
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) softmax(scores.data() + h * len, len);
  std::fill(out, out + heads * dim, 0.f);
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      to_float(v_cache + (slot * kv_heads + kv) * dim, row.data(), dim);
      const float row_scale = static_cast<float>(v_scale[slot * kv_heads + kv]);
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
        const float p = scores[h * len + pos] * row_scale;
        float* o = out + h * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] += p * row[d];
      }
    }
  }
}

#ifdef __AVX512F__
// Rows ahead of the current one whose cache lines are requested early (pages sit anywhere
// in the pool), as in paged_attention_cpu.cpp.
constexpr int64_t kPrefetchRows = 16;

// 16 stored values -> 16 floats in registers, times unit_of<T> (exact).
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// e4m3fn -> the float16 of the same sign, exponent field and mantissa bits: its value
// times 2^-8, subnormals included (the exponent biases differ by 8 and float16 keeps the 3
// mantissa bits), widened exactly by vcvtph2ps, which ignores MXCSR.DAZ; the 2^8 is folded
// into the row's scale (unit_of). Sign-extended to 16 bits and shifted left by 7, the byte
// S.EEEE.MMM lands as S S EEEE MMM 0000000: clearing bit 14 leaves the float16. The NaN
// pattern (S.1111.111) stays NaN.
inline __m512 load16(const c10::Float8_e4m3fn* p) {
  const __m256i x = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 7);
  const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x3F80)), _mm256_set1_epi16(0x3F80));
  // x where 0xBF80 has a bit, else the NaN mask (one vpternlog): x & 0xBF80 for a number,
  // S.11111.1111111111 for NaN.
  const __m256i keep = _mm256_set1_epi16(static_cast<int16_t>(0xBF80));
  return _mm512_cvtph_ps(_mm256_or_si256(_mm256_and_si256(x, keep), _mm256_andnot_si256(keep, nan)));
}

template <typename T>
constexpr float unit_of = std::is_same_v<T, int8_t> ? 1.f : 256.f;

template <typename T, int DIM>
inline void prefetch_row(const T* p) {
  for (int line = 0; line < (DIM * static_cast<int>(sizeof(T)) + 63) / 64; ++line)
    _mm_prefetch(reinterpret_cast<const char*>(p) + 64 * line, _MM_HINT_T0);
}

// Lane j of the result: the sum of the 16 lanes of v[j], by a fixed tree (the same for
// every j whatever the other vectors hold): 45 shuffles and adds for 16 sums.
inline __m512 reduce16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sum of v[4i + 0..3]
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

// s[0..n) <- softmax(s[0..n)) * w[0..n), in place, 16 lanes at a time.
void softmax_times(float* s, const float* w, int64_t n) {
  __m512 peaks = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    peaks = _mm512_mask_max_ps(peaks, m, peaks, _mm512_maskz_loadu_ps(m, s + i));
  }
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(peaks));
  __m512 sums = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = pdserve::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), peak));
    _mm512_mask_storeu_ps(s + i, m, e);
    sums = _mm512_mask_add_ps(sums, m, sums, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sums));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), inverse);
    _mm512_mask_storeu_ps(s + i, m, _mm512_mul_ps(p, _mm512_maskz_loadu_ps(m, w + i)));
  }
}

// HEADS query heads of KV head `kv` (a head_dim of DIM, a multiple of 16) against `len`
// paged quantized rows: each query head (times `scale`) in DIM / 16 registers while the KV
// head's rows stream past once for all of them, each row dequantized in registers. The
// dot products of 16 consecutive positions are reduced together (reduce16) and scaled
// by their rows' K scales; the V scales ride on the softmax, so the second pass is the
// float kernel's with a dequantizing load. q and out point at the first of the heads;
// s holds (HEADS + 1) * len floats (the scores, then the V scales).
template <typename T, int DIM, int HEADS>
void decode_heads_avx512(const float* q, const T* k_cache, const T* v_cache, const at::Half* k_scale,
                         const at::Half* v_scale, const int64_t* table, int64_t len, int64_t block_size,
                         int64_t kv_heads, int64_t kv, float scale, float* out, float* s) {
  constexpr int kRegs = DIM / 16;
  const __m512 unit = _mm512_set1_ps(unit_of<T>);
  float* row_v_scale = s + HEADS * len;
  __m512 qh[HEADS][kRegs];
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r)
      qh[h][r] = _mm512_mul_ps(_mm512_loadu_ps(q + h * DIM + 16 * r), _mm512_set1_ps(scale));
  for (int64_t pos = 0; pos < std::min(len, kPrefetchRows); ++pos) {
    const int64_t row = (table[pos / block_size] * block_size + pos % block_size) * kv_heads + kv;
    prefetch_row<T, DIM>(k_cache + row * DIM);
    prefetch_row<T, DIM>(v_cache + row * DIM);
  }
  // The walk over pages: (page, offset) follows position pos, (ahead_page, ahead_offset)
  // position pos + kPrefetchRows; `row` indexes a (token, kv head) row (data at row * DIM).
  int64_t page = 0, offset = 0, ahead_page = kPrefetchRows / block_size, ahead_offset = kPrefetchRows % block_size;
  for (int64_t first = 0; first < len; first += 16) {
    const int64_t count = std::min<int64_t>(16, len - first);
    __m512 dots[HEADS][16];
    alignas(32) uint16_t k_bits[16], v_bits[16];
    for (int j = 0; j < 16; ++j) {
      if (j >= count) {  // past the end: lanes that are never stored
        for (int h = 0; h < HEADS; ++h) dots[h][j] = _mm512_setzero_ps();
        k_bits[j] = v_bits[j] = 0;
        continue;
      }
      if (first + j + kPrefetchRows < len) {
        // The V rows too: the second pass then finds them in cache from its first row on.
        const int64_t ahead = (table[ahead_page] * block_size + ahead_offset) * kv_heads + kv;
        prefetch_row<T, DIM>(k_cache + ahead * DIM);
        prefetch_row<T, DIM>(v_cache + ahead * DIM);
        if (++ahead_offset == block_size) ahead_offset = 0, ++ahead_page;
      }
      const int64_t row = (table[page] * block_size + offset) * kv_heads + kv;
      if (++offset == block_size) offset = 0, ++page;
      const T* k = k_cache + row * DIM;
      __m512 kr[kRegs];
      for (int r = 0; r < kRegs; ++r) kr[r] = load16(k + 16 * r);
      k_bits[j] = k_scale[row].x;
      v_bits[j] = v_scale[row].x;
      for (int h = 0; h < HEADS; ++h) {
        __m512 dot = _mm512_mul_ps(qh[h][0], kr[0]);
        for (int r = 1; r < kRegs; ++r) dot = _mm512_fmadd_ps(qh[h][r], kr[r], dot);
        dots[h][j] = dot;
      }
    }
    const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
    const __m512 ks = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(k_bits))), unit);
    for (int h = 0; h < HEADS; ++h) _mm512_mask_storeu_ps(s + h * len + first, lanes, _mm512_mul_ps(reduce16(dots[h]), ks));
    _mm512_mask_storeu_ps(row_v_scale + first, lanes,
                          _mm512_mul_ps(_mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(v_bits))), unit));
  }
  for (int h = 0; h < HEADS; ++h) softmax_times(s + h * len, row_v_scale, len);
  __m512 o[HEADS][kRegs];
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r) o[h][r] = _mm512_setzero_ps();
  page = 0, offset = 0;
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t row = (table[page] * block_size + offset) * kv_heads + kv;
    if (++offset == block_size) offset = 0, ++page;
    const T* v = v_cache + row * DIM;
    __m512 vr[kRegs];
    for (int r = 0; r < kRegs; ++r) vr[r] = load16(v + 16 * r);
    for (int h = 0; h < HEADS; ++h) {
      const __m512 p = _mm512_set1_ps(s[h * len + pos]);
      for (int r = 0; r < kRegs; ++r) o[h][r] = _mm512_fmadd_ps(p, vr[r], o[h][r]);
    }
  }
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r) _mm512_storeu_ps(out + h * DIM + 16 * r, o[h][r]);
}

// One decoding sequence with a head_dim of DIM: each KV head's group of query heads in
// chunks of up to kChunk heads (what fits in registers beside a row), so every KV row is
// read and dequantized once per chunk. The chunks depend on the model's shape only.
template <typename T, int DIM>
void decode_sequence_avx512(const float* q, const T* k_cache, const T* v_cache, const at::Half* k_scale,
                            const at::Half* v_scale, const int64_t* table, int64_t len, int64_t block_size,
                            int64_t kv_heads, int64_t group, float scale, float* out, std::vector<float>& scores) {
  constexpr int kChunk = DIM == 128 ? 2 : 4;
  scores.resize(static_cast<size_t>((kChunk + 1) * len));
  for (int64_t kv = 0; kv < kv_heads; ++kv) {
    for (int64_t first = 0; first < group; first += kChunk) {
      const int64_t h = kv * group + first, n = std::min<int64_t>(kChunk, group - first);
      const float* qh = q + h * DIM;
      float* oh = out + h * DIM;
#define PDSERVE_HEADS(N) \
  decode_heads_avx512<T, DIM, N>(qh, k_cache, v_cache, k_scale, v_scale, table, len, block_size, kv_heads, kv, \
                                 scale, oh, scores.data())
      switch (n) {
        case 1: PDSERVE_HEADS(1); break;
        case 2: PDSERVE_HEADS(2); break;
        case 3: if constexpr (kChunk >= 3) PDSERVE_HEADS(3); break;
        default: if constexpr (kChunk >= 4) PDSERVE_HEADS(4); break;
      }
#undef PDSERVE_HEADS
    }
  }
}
#endif

// The decoding sequence's output through the fastest path for its head_dim.
template <typename T>
void decode_sequence(const float* q, const T* k_cache, const T* v_cache, const at::Half* k_scale,
                     const at::Half* v_scale, const int64_t* table, int64_t len, int64_t block_size,
                     int64_t kv_heads, int64_t group, int64_t dim, float scale, float* out) {
  thread_local std::vector<float> scores;  // reused by every call on this thread
#ifdef __AVX512F__
  if (dim == 32)
    return decode_sequence_avx512<T, 32>(q, k_cache, v_cache, k_scale, v_scale, table, len, block_size, kv_heads,
                                         group, scale, out, scores);
  if (dim == 64)
    return decode_sequence_avx512<T, 64>(q, k_cache, v_cache, k_scale, v_scale, table, len, block_size, kv_heads,
                                         group, scale, out, scores);
  if (dim == 128)
    return decode_sequence_avx512<T, 128>(q, k_cache, v_cache, k_scale, v_scale, table, len, block_size, kv_heads,
                                          group, scale, out, scores);
#endif
  decode_rows(q, k_cache, v_cache, k_scale, v_scale, table, len, block_size, kv_heads, group, dim, scale, out,
              scores);
}

}  // namespace

void check_quantized_cache(const torch::Tensor& cache, const torch::Tensor& scales, const char* name) {
  TORCH_CHECK(cache.scalar_type() == torch::kInt8 || cache.scalar_type() == torch::kFloat8_e4m3fn,
              name, " with scales must be int8 or float8_e4m3fn");
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), name, " must be a contiguous [blocks, block_size, KVH, D] tensor");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == cache.size(0) && scales.size(1) == cache.size(1) && scales.size(2) == cache.size(2),
              "the scales of ", name, " must be a contiguous float16 [blocks, block_size, KVH] tensor");
}

void store_kv_quantized(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor k_scale, torch::Tensor v_scale, const int64_t* slots) {
  check_quantized_cache(k_cache, k_scale, "k_cache");
  check_quantized_cache(v_cache, v_scale, "v_cache");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
  if (k_cache.scalar_type() == torch::kInt8) {
    store_rows<int8_t>(k, k_cache, k_scale, slots);
    store_rows<int8_t>(v, v_cache, v_scale, slots);
  } else {
    store_rows<c10::Float8_e4m3fn>(k, k_cache, k_scale, slots);
    store_rows<c10::Float8_e4m3fn>(v, v_cache, v_scale, slots);
  }
}

void decode_quantized(const float* q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& k_scale, const torch::Tensor& v_scale, const int64_t* table, int64_t len,
                      int64_t group, float scale, float* out) {
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const at::Half* ks = k_scale.data_ptr<at::Half>();
  const at::Half* vs = v_scale.data_ptr<at::Half>();
  if (k_cache.scalar_type() == torch::kInt8) {
    decode_sequence(q, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ks, vs, table, len, block_size,
                    kv_heads, group, dim, scale, out);
  } else {
    decode_sequence(q, reinterpret_cast<const c10::Float8_e4m3fn*>(k_cache.data_ptr()),
                    reinterpret_cast<const c10::Float8_e4m3fn*>(v_cache.data_ptr()), ks, vs, table, len, block_size,
                    kv_heads, group, dim, scale, out);
  }
}

torch::Tensor gather_dequantized(const torch::Tensor& cache, const torch::Tensor& scales, const torch::Tensor& table,
                                 int64_t len) {
  const int64_t block_size = cache.size(1);
  const auto pages = table.slice(0, 0, (len + block_size - 1) / block_size);
  auto rows = cache.index_select(0, pages).reshape({-1, cache.size(2), cache.size(3)}).slice(0, 0, len);
  auto row_scales = scales.index_select(0, pages).reshape({-1, scales.size(2)}).slice(0, 0, len);
  return rows.to(torch::kFloat32).mul_(row_scales.to(torch::kFloat32).unsqueeze(-1));
}
