// A quantized KV cache on the CPU: int8 or float8_e4m3fn rows with one float16 scale per
// (token, kv-head) row, as kernels/kv_quant.py defines them.
//
//   store_kv_quantized     store_kv_ref with scales: each row quantized with its own scale,
//                          bit-identical to quantize_kv_ref (same float32 operations)
//   decode_quantized       one decoding sequence's attention straight from the stored rows:
//                          a row is dequantized into a head_dim buffer once and used by
//                          every query head of its group (scores scaled by the row's scale)
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
                 int64_t group, int64_t dim, float scale, float* out) {
  const int64_t heads = kv_heads * group;
  std::vector<float> scores(static_cast<size_t>(heads * len)), row(static_cast<size_t>(dim));
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
    decode_rows(q, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), ks, vs, table, len, block_size, kv_heads,
                group, dim, scale, out);
  } else {
    decode_rows(q, reinterpret_cast<const c10::Float8_e4m3fn*>(k_cache.data_ptr()),
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
