// What every sampling step needs from each row of logits, in one pass over the row's
// values for the maximum and one for the normaliser: the greedy token and logsumexp.
//
// argmax is torch.argmax's (the first maximum; rows are expected free of NaN, which
// torch would pick and this skips), logsumexp is torch.logsumexp's up to float32
// summation order. At SmolLM2's 49,152-entry vocabulary, torch's argmax alone takes
// longer than both here (1.8 ms at 32 rows on 2 cores).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "vec_math.h"

namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// (index of the first maximum, the maximum) of x[0..n).
std::pair<int64_t, float> first_max(const float* x, int64_t n) {
  int64_t best = 0;
  float peak = kMinusInf;
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 lane_peak = _mm512_set1_ps(kMinusInf);
  __m512i lane_index = _mm512_setzero_si512();
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    // Strictly greater: each lane keeps its first maximum.
    const __mmask16 greater = _mm512_cmp_ps_mask(v, lane_peak, _CMP_GT_OQ);
    lane_peak = _mm512_mask_blend_ps(greater, lane_peak, v);
    lane_index = _mm512_mask_blend_epi32(greater, lane_index, index);
    index = _mm512_add_epi32(index, step);
  }
  alignas(64) float peaks[16];
  alignas(64) int32_t indices[16];
  _mm512_store_ps(peaks, lane_peak);
  _mm512_store_si512(indices, lane_index);
  for (int lane = 0; lane < 16; ++lane) {
    if (peaks[lane] > peak || (peaks[lane] == peak && peaks[lane] != kMinusInf && indices[lane] < best)) {
      peak = peaks[lane];
      best = indices[lane];
    }
  }
#endif
  for (; i < n; ++i) {
    if (x[i] > peak) {
      peak = x[i];
      best = i;
    }
  }
  return {best, peak};
}

// log(sum(exp(x[0..n) - peak))) + peak.
float logsumexp(const float* x, int64_t n, float peak) {
  if (peak == kMinusInf) return kMinusInf;
  float total = 0.f;
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(peak);
  for (; i + 16 <= n; i += 16) sum = _mm512_add_ps(sum, pdserve::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift)));
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += pdserve::exp_scalar(x[i] - peak);
  return peak + std::log(total);
}

}  // namespace

// logits [B, V] float32 with contiguous rows -> (argmax [B] int64, logsumexp [B] float32).
std::tuple<torch::Tensor, torch::Tensor> argmax_logsumexp(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1,
              "logits must be a float32 [B, V] tensor with contiguous rows");
  TORCH_CHECK(logits.size(1) > 0, "logits need at least one column");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto ids = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  auto lse = torch::empty({rows}, logits.options());
  int64_t* id_ptr = ids.data_ptr<int64_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const float* base = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = base + r * stride;
      const auto [best, peak] = first_max(row, vocab);
      id_ptr[r] = best;
      lse_ptr[r] = logsumexp(row, vocab, peak);
    }
  });
  return {ids, lse};
}
