// Paged attention for a whole mixed batch on the CPU, in one call.
//
// Same contract as `paged_attention_ref` (kernels/attention.py), with the per-sequence
// lengths as int64 tensors instead of host lists:
//   q            [T, H, D] float32, the queries of all sequences packed in order
//   k/v_cache    [num_blocks, block_size, KVH, D] float32, contiguous (one layer of the pool),
//                or int8 / float8_e4m3fn with k/v_scale [num_blocks, block_size, KVH] float16
//   block_tables [B, max_pages] int64
//   query_start  [B + 1] int64 offsets of each sequence's queries in q
//   seq_lens     [B] int64 context length of each sequence (its queries are the last ones)
// Returns [T, H, D]. Reads the cache only.
//
// Decoding sequences (one query) are computed here directly from the pages, one task per
// sequence, in parallel: the query heads of a KV head's group held in registers while
// that head's rows stream past once for all of them, rows fetched ahead through the block
// table (memory-bound: at batch 32 on SmolLM2, 192 MB of float32 K/V a step, 8 -> 14
// GB/s with the prefetch). Sequences with several queries (prefill chunks, drafts) gather their
// context once and run, per KV head and block of 64 queries, two GEMMs (the group's query
// heads stacked as rows) around a softmax that stops at each query's position: 3-4x
// ATen's scaled_dot_product_attention with a mask on these shapes, and no work on the
// masked half beyond the block's last query.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace {

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

// s[0..n) <- exp(s[0..n) - max(s)), in place; returns their sum (> 0 for finite input).
float exp_shifted_sum(float* s, int64_t n) {
  float peak = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 peaks = _mm512_set1_ps(peak);
  for (; i + 16 <= n; i += 16) peaks = _mm512_max_ps(peaks, _mm512_loadu_ps(s + i));
  peak = _mm512_reduce_max_ps(peaks);
#endif
  for (; i < n; ++i) peak = std::max(peak, s[i]);
  float total = 0.f;
  i = 0;
#ifdef __AVX512F__
  const __m512 shift = _mm512_set1_ps(peak);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = pdserve::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), shift));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) {
    s[i] = pdserve::exp_scalar(s[i] - peak);
    total += s[i];
  }
  return total;
}

// One decoding sequence: its H queries against `len` paged rows, any head_dim. Each cache
// row (all KV heads, contiguous) is read once, front to back, for every head of every group.
void decode_sequence(const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
                     int64_t len, int64_t block_size, int64_t kv_heads, int64_t group, int64_t dim,
                     float scale, float* out, std::vector<float>& scores) {
  const int64_t heads = kv_heads * group, row_stride = kv_heads * dim;
  scores.resize(static_cast<size_t>(heads * len));
  for (int64_t pos = 0; pos < len; ++pos) {
    const float* k_row = k_cache + (table[pos / block_size] * block_size + pos % block_size) * row_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + h * dim;
      const float* k = k_row + (h / group) * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qh[d] * k[d];
      scores[h * len + pos] = dot * scale;
    }
  }
  for (int64_t h = 0; h < heads; ++h) softmax(scores.data() + h * len, len);
  std::fill(out, out + heads * dim, 0.f);
  for (int64_t pos = 0; pos < len; ++pos) {
    const float* v_row = v_cache + (table[pos / block_size] * block_size + pos % block_size) * row_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * len + pos];
      const float* v = v_row + (h / group) * dim;
      float* o = out + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += p * v[d];
    }
  }
}

#ifdef __AVX512F__
// Rows ahead of the current one whose cache lines are requested early: pages sit anywhere
// in the pool, so the hardware prefetcher loses the stream at every page edge.
constexpr int64_t kPrefetchRows = 16;

// The address of position `pos`'s cache row (all KV heads) through the block table.
inline const float* cache_row(const float* cache, const int64_t* table, int64_t pos, int64_t block_size,
                              int64_t row_stride) {
  return cache + (table[pos / block_size] * block_size + pos % block_size) * row_stride;
}

template <int DIM>
inline void prefetch_head(const float* p) {
  for (int line = 0; line < DIM / 16; ++line) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * line), _MM_HINT_T0);
}

// HEADS query heads of one KV head (a head_dim of DIM, a multiple of 16) against `len`
// paged rows, each query head and its output held in DIM / 16 registers while the KV
// head's rows stream past once for all of them. q and out point at the first of the
// heads; s holds HEADS * len scores.
template <int DIM, int HEADS>
void decode_heads_avx512(const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
                         int64_t len, int64_t block_size, int64_t row_stride, int64_t offset, float scale,
                         float* out, float* s) {
  constexpr int kRegs = DIM / 16;
  __m512 qh[HEADS][kRegs];
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r)
      qh[h][r] = _mm512_mul_ps(_mm512_loadu_ps(q + h * DIM + 16 * r), _mm512_set1_ps(scale));
  for (int64_t pos = 0; pos < std::min(len, kPrefetchRows); ++pos) {
    prefetch_head<DIM>(cache_row(k_cache, table, pos, block_size, row_stride) + offset);
    prefetch_head<DIM>(cache_row(v_cache, table, pos, block_size, row_stride) + offset);
  }
  for (int64_t pos = 0; pos < len; ++pos) {
    if (pos + kPrefetchRows < len) {
      // The V rows too: the second pass then finds them in cache from its first row on.
      const int64_t ahead = (table[(pos + kPrefetchRows) / block_size] * block_size +
                             (pos + kPrefetchRows) % block_size) * row_stride + offset;
      prefetch_head<DIM>(k_cache + ahead);
      prefetch_head<DIM>(v_cache + ahead);
    }
    const float* k = cache_row(k_cache, table, pos, block_size, row_stride) + offset;
    __m512 kr[kRegs];
    for (int r = 0; r < kRegs; ++r) kr[r] = _mm512_loadu_ps(k + 16 * r);
    for (int h = 0; h < HEADS; ++h) {
      __m512 dot = _mm512_mul_ps(qh[h][0], kr[0]);
      for (int r = 1; r < kRegs; ++r) dot = _mm512_fmadd_ps(qh[h][r], kr[r], dot);
      s[h * len + pos] = _mm512_reduce_add_ps(dot);
    }
  }
  for (int h = 0; h < HEADS; ++h) softmax(s + h * len, len);
  __m512 o[HEADS][kRegs];
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r) o[h][r] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < len; ++pos) {
    const float* v = cache_row(v_cache, table, pos, block_size, row_stride) + offset;
    __m512 vr[kRegs];
    for (int r = 0; r < kRegs; ++r) vr[r] = _mm512_loadu_ps(v + 16 * r);
    for (int h = 0; h < HEADS; ++h) {
      const __m512 p = _mm512_set1_ps(s[h * len + pos]);
      for (int r = 0; r < kRegs; ++r) o[h][r] = _mm512_fmadd_ps(p, vr[r], o[h][r]);
    }
  }
  for (int h = 0; h < HEADS; ++h)
    for (int r = 0; r < kRegs; ++r) _mm512_storeu_ps(out + h * DIM + 16 * r, o[h][r]);
}

// One decoding sequence with a head_dim of DIM: each KV head's group of query heads in
// chunks of up to 64 / DIM * 4 heads (what fits in registers beside a row), so every KV
// row is read once per chunk rather than once per query head.
template <int DIM>
void decode_sequence_avx512(const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
                            int64_t len, int64_t block_size, int64_t kv_heads, int64_t group, float scale,
                            float* out, std::vector<float>& scores) {
  constexpr int kChunk = DIM == 64 ? 4 : 2;
  const int64_t row_stride = kv_heads * DIM;
  scores.resize(static_cast<size_t>(kChunk * len));
  for (int64_t kv = 0; kv < kv_heads; ++kv) {
    for (int64_t first = 0; first < group; first += kChunk) {
      const int64_t h = kv * group + first, n = std::min<int64_t>(kChunk, group - first);
      const float* qh = q + h * DIM;
      float* oh = out + h * DIM;
      const int64_t offset = kv * DIM;
      switch (n) {
        case 1: decode_heads_avx512<DIM, 1>(qh, k_cache, v_cache, table, len, block_size, row_stride, offset, scale, oh, scores.data()); break;
        case 2: decode_heads_avx512<DIM, 2>(qh, k_cache, v_cache, table, len, block_size, row_stride, offset, scale, oh, scores.data()); break;
        case 3: if constexpr (kChunk >= 3) decode_heads_avx512<DIM, 3>(qh, k_cache, v_cache, table, len, block_size, row_stride, offset, scale, oh, scores.data()); break;
        default: if constexpr (kChunk >= 4) decode_heads_avx512<DIM, 4>(qh, k_cache, v_cache, table, len, block_size, row_stride, offset, scale, oh, scores.data()); break;
      }
    }
  }
}
#endif

// The decoding sequence's output through the fastest path for its head_dim.
void decode(const float* q, const float* k_cache, const float* v_cache, const int64_t* table, int64_t len,
            int64_t block_size, int64_t kv_heads, int64_t group, int64_t dim, float scale, float* out,
            std::vector<float>& scores) {
#ifdef __AVX512F__
  if (dim == 64)
    return decode_sequence_avx512<64>(q, k_cache, v_cache, table, len, block_size, kv_heads, group, scale, out,
                                      scores);
  if (dim == 128)
    return decode_sequence_avx512<128>(q, k_cache, v_cache, table, len, block_size, kv_heads, group, scale,
                                       out, scores);
#endif
  decode_sequence(q, k_cache, v_cache, table, len, block_size, kv_heads, group, dim, scale, out, scores);
}

torch::Tensor gather_context(const torch::Tensor& cache, const torch::Tensor& table, int64_t len) {
  const int64_t block_size = cache.size(1);
  const int64_t pages = (len + block_size - 1) / block_size;
  auto rows = cache.index_select(0, table.slice(0, 0, pages));
  return rows.reshape({-1, cache.size(2), cache.size(3)}).slice(0, 0, len);
}

// Queries of a multi-query sequence per task: the scores of one task, [group * 64, context]
// floats, stay within the L2 cache for contexts of a few thousand tokens.
constexpr int64_t kQueryBlock = 64;

struct ChunkTask {
  int64_t sequence, kv_head, first, last;  // queries [first, last) of the sequence
};

// Causal attention of queries [first, last) of a sequence with `n` queries over its `len`
// gathered context rows k, v [len, KVH, D], for the query heads of one KV head: two GEMMs
// (every head of the group stacked as rows) around a row-wise softmax that stops at each
// query's own position (query j sits at position len - n + j).
void chunk_block(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t q_start,
                 int64_t n, int64_t len, const ChunkTask& task, int64_t group, float scale, torch::Tensor& out) {
  const int64_t rows = task.last - task.first, dim = q.size(2);
  const int64_t visible = len - n + task.last;  // keys the last query of the block sees
  const int64_t h0 = task.kv_head * group;
  // [rows, group, D] -> [rows * group, D]: row r is query first + r / group, head h0 + r % group.
  // Scaled here (one pass over D per row) rather than the scores (one over the context).
  auto queries = q.slice(0, q_start + task.first, q_start + task.last).slice(1, h0, h0 + group)
                     .reshape({rows * group, dim}) * scale;
  auto keys = k.slice(0, 0, visible).select(1, task.kv_head);    // [visible, D], rows strided
  auto values = v.slice(0, 0, visible).select(1, task.kv_head);
  auto scores = at::mm(queries, keys.t());                       // [rows * group, visible]
  auto inverse_sums = torch::empty({rows * group, 1}, scores.options());
  float* s = scores.data_ptr<float>();
  float* inverse = inverse_sums.data_ptr<float>();
  for (int64_t r = 0; r < rows * group; ++r) {
    float* row = s + r * visible;
    const int64_t sees = len - n + task.first + r / group + 1;
    // Unnormalised softmax; the output rows are divided by the sums after the second GEMM
    // (D values a row instead of the context's).
    inverse[r] = 1.f / exp_shifted_sum(row, sees);
    std::fill(row + sees, row + visible, 0.f);
  }
  auto o = at::mm(scores, values).mul_(inverse_sums).view({rows, group, dim});
  out.slice(0, q_start + task.first, q_start + task.last).slice(1, h0, h0 + group).copy_(o);
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale, c10::optional<torch::Tensor> k_scale,
                              c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous float32 [T, H, D] tensor");
  // A quantized cache (int8 / float8_e4m3fn, float16 scales per row): kv_quant_cpu.cpp
  // reads it; the float32 path below is unchanged by it.
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "k_scale and v_scale go together");
  const bool quantized = k_scale.has_value();
  if (quantized) {
    check_quantized_cache(k_cache, *k_scale, "k_cache");
    check_quantized_cache(v_cache, *v_scale, "v_cache");
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
                "k_cache and v_cache must match");
  } else {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                    v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32 &&
                    v_cache.scalar_type() == torch::kFloat32,
                "k_cache and v_cache must be contiguous float32 [blocks, block_size, KVH, D] tensors");
  }
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && query_start.scalar_type() == torch::kInt64 &&
                  seq_lens.scalar_type() == torch::kInt64,
              "block_tables, query_start and seq_lens must be int64");
  const int64_t heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "q and the cache disagree on heads or head_dim");
  const int64_t group = heads / kv_heads;
  const int64_t batch = seq_lens.size(0);
  TORCH_CHECK(query_start.size(0) == batch + 1 && block_tables.size(0) == batch,
              "query_start needs B + 1 entries and block_tables B rows");
  auto tables = block_tables.contiguous();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t max_pages = tables.size(1);
  TORCH_CHECK(starts[0] == 0 && starts[batch] == q.size(0), "query_start must run from 0 to T");
  std::vector<int64_t> decoding;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = starts[b + 1] - starts[b];
    TORCH_CHECK(0 < n && n <= lens[b], "sequence ", b, ": ", n, " queries for context ", lens[b]);
    TORCH_CHECK(lens[b] <= max_pages * block_size, "sequence ", b, ": context longer than its block table");
    if (n == 1) decoding.push_back(b);
  }
  auto out = torch::empty_like(q);
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = quantized ? nullptr : k_cache.data_ptr<float>();
  const float* v_ptr = quantized ? nullptr : v_cache.data_ptr<float>();
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t num_decoding = static_cast<int64_t>(decoding.size());
  at::parallel_for(0, num_decoding, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = decoding[i], token = starts[b];
      if (quantized) {
        decode_quantized(q_ptr + token * heads * dim, k_cache, v_cache, *k_scale, *v_scale, table_ptr + b * max_pages,
                         lens[b], group, static_cast<float>(scale), out_ptr + token * heads * dim);
        continue;
      }
      decode(q_ptr + token * heads * dim, k_ptr, v_ptr, table_ptr + b * max_pages, lens[b], block_size,
             kv_heads, group, dim, static_cast<float>(scale), out_ptr + token * heads * dim, scores);
    }
  });
  // Sequences with several queries: their contexts gathered once, then one task per
  // (sequence, KV head, block of queries), in parallel.
  std::vector<ChunkTask> tasks;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> contexts(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = starts[b + 1] - starts[b];
    if (n == 1) continue;
    if (quantized)
      contexts[b] = {gather_dequantized(k_cache, *k_scale, tables[b], lens[b]),
                     gather_dequantized(v_cache, *v_scale, tables[b], lens[b])};
    else
      contexts[b] = {gather_context(k_cache, tables[b], lens[b]), gather_context(v_cache, tables[b], lens[b])};
    for (int64_t kv = 0; kv < kv_heads; ++kv)
      for (int64_t first = 0; first < n; first += kQueryBlock) tasks.push_back({b, kv, first, std::min(n, first + kQueryBlock)});
  }
  // Worker threads do not inherit the caller's inference mode, which the tensor ops of a
  // task need when the caller's tensors are inference tensors.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    for (int64_t i = begin; i < end; ++i) {
      const ChunkTask& task = tasks[i];
      const auto& [k, v] = contexts[task.sequence];
      chunk_block(q, k, v, starts[task.sequence], starts[task.sequence + 1] - starts[task.sequence],
                  lens[task.sequence], task, group, static_cast<float>(scale), out);
    }
  });
  return out;
}
