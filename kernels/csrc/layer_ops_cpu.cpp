// The small per-layer operations of a decoder on the CPU, each one pass over its rows.
//
// Each has the contract of its PyTorch reference (named below) for float32 tensors. At
// decode batch sizes the references cost more in ATen's per-op work (allocations,
// dispatch, several passes) than in arithmetic: RMSNorm alone is eight ops, RoPE about
// fifteen. Rows run in parallel only when there are enough of them to pay for it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

#include "kernels.h"
#include "vec_math.h"

namespace {

// Rows below this many elements in total run on the calling thread.
constexpr int64_t kParallelElements = 1 << 16;

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, row_elements)); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.stride(1) == 1,
              name, " must be a float32 [rows, N] tensor with contiguous rows");
}

}  // namespace

// rms_norm_ref (kernels/rmsnorm.py): (weight * x / rms(x), x), with x = x + residual first
// when a residual is given. The sum of squares is accumulated in double.
std::tuple<torch::Tensor, torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                                  c10::optional<torch::Tensor> residual) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == torch::kFloat32 &&
                  weight.is_contiguous(), "weight must be a contiguous float32 [N] tensor");
  const bool has_residual = residual.has_value() && residual->defined();
  auto out = torch::empty({rows, n}, x.options());
  auto sum = has_residual ? torch::empty({rows, n}, x.options()) : x;
  if (has_residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape");
  }
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x.data_ptr<float>() + r * x.stride(0);
      float* sr = sum.data_ptr<float>() + r * sum.stride(0);
      if (has_residual) {
        const float* rr = residual->data_ptr<float>() + r * residual->stride(0);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sr[i] = xr[i] + rr[i];
      }
      double squares = 0.0;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(sr[i]) * sr[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
      float* o = out.data_ptr<float>() + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (sr[i] * inv);
    }
  });
  return {out, sum};
}

// rope_ref (kernels/rope.py): q [T, H, D] and k [T, KVH, D] (views with a contiguous last
// dimension, e.g. slices of a fused QKV output) rotated by their positions [T] int64 with
// cos_sin [max_positions, D] (cos in the first half, sin in the second). Element i of a
// head pairs with element i + D / 2. Returns new contiguous tensors.
std::tuple<torch::Tensor, torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                              torch::Tensor cos_sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q must be [T, H, D] and k [T, KVH, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 && q.stride(2) == 1 &&
                  k.stride(2) == 1, "q and k must be float32 with a contiguous head dimension");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0) && positions.scalar_type() == torch::kInt64,
              "positions must be int64 [T]");
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && cos_sin.dim() == 2 && cos_sin.size(1) == dim && cos_sin.is_contiguous() &&
                  cos_sin.scalar_type() == torch::kFloat32, "cos_sin must be a contiguous float32 [positions, D] tensor");
  auto positions_c = positions.contiguous();
  const int64_t* pos = positions_c.data_ptr<int64_t>();
  const int64_t max_position = cos_sin.size(0);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(0 <= pos[t] && pos[t] < max_position, "position ", pos[t], " outside the RoPE cache");
  auto q_out = torch::empty({tokens, heads, dim}, q.options());
  auto k_out = torch::empty({tokens, kv_heads, dim}, k.options());
  const float* table = cos_sin.data_ptr<float>();
  auto rotate = [&](const torch::Tensor& src, torch::Tensor& dst, int64_t t) {
    const float* cos = table + pos[t] * dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < src.size(1); ++h) {
      const float* x = src.data_ptr<float>() + t * src.stride(0) + h * src.stride(1);
      float* y = dst.data_ptr<float>() + (t * src.size(1) + h) * dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        y[i] = x[i] * cos[i] - x[i + half] * sin[i];
        y[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
      }
    }
  };
  at::parallel_for(0, tokens, grain((heads + kv_heads) * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate(q, q_out, t);
      rotate(k, k_out, t);
    }
  });
  return {q_out, k_out};
}

// silu_mul_ref (kernels/activation.py): gate_up [T, 2I] -> silu(gate) * up [T, I], where
// gate is the first half of each row and up the second.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  auto out = torch::empty({rows, width}, gate_up.options());
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gate_up.data_ptr<float>() + r * gate_up.stride(0);
      const float* up = gate + width;
      float* o = out.data_ptr<float>() + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) o[i] = -gate[i];
      pdserve::exp_array(o, o, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) o[i] = gate[i] / (1.f + o[i]) * up[i];
    }
  });
  return out;
}

// store_kv_ref (kernels/kv_store.py): token t's k/v [T, KVH, D] written to flat slot
// slot_mapping[t] of k/v_cache [blocks, block_size, KVH, D]; a slot of -1 is padding.
// With scales, the cache is quantized (kv_quant_cpu.cpp).
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping, c10::optional<torch::Tensor> k_scale,
              c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 3 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && k.stride(2) == 1 && v.stride(2) == 1,
              "k and v must be float32 [T, KVH, D] with a contiguous head dimension");
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "k_scale and v_scale go together");
  if (k_scale.has_value()) {
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
                "k_cache and v_cache must be [blocks, block_size, KVH, D] matching k");
    TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                    slot_mapping.scalar_type() == torch::kInt64, "slot_mapping must be int64 [T]");
    auto slots_c = slot_mapping.contiguous();
    const int64_t* slots = slots_c.data_ptr<int64_t>();
    const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
    for (int64_t t = 0; t < k.size(0); ++t)
      TORCH_CHECK(-1 <= slots[t] && slots[t] < num_slots, "slot ", slots[t], " outside the cache");
    store_kv_quantized(k, v, k_cache, v_cache, *k_scale, *v_scale, slots);
    return;
  }
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == torch::kFloat32 && k_cache.size(2) == k.size(1) &&
                  k_cache.size(3) == k.size(2),
              "k_cache and v_cache must be contiguous float32 [blocks, block_size, KVH, D] matching k");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) &&
                  slot_mapping.scalar_type() == torch::kInt64, "slot_mapping must be int64 [T]");
  auto slots_c = slot_mapping.contiguous();
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  const int64_t tokens = k.size(0), kv_heads = k.size(1), dim = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), row = kv_heads * dim;
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(-1 <= slots[t] && slots[t] < num_slots, "slot ", slots[t], " outside the cache");
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  at::parallel_for(0, tokens, grain(2 * row), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(kc + slots[t] * row + h * dim, k.data_ptr<float>() + t * k.stride(0) + h * k.stride(1),
                    dim * sizeof(float));
        std::memcpy(vc + slots[t] * row + h * dim, v.data_ptr<float>() + t * v.stride(0) + h * v.stride(1),
                    dim * sizeof(float));
      }
    }
  });
}
