// The CPU kernels' entry points, each defined in its own source file (named below) and
// exposed to Python by bindings.cpp. All take float32 CPU tensors (a KV cache may be int8
// or float8_e4m3fn with float16 scales); see each definition.
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>

// paged_attention_cpu.cpp (k_scale, v_scale: a quantized cache's, see kv_quant_cpu.cpp)
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale, c10::optional<torch::Tensor> k_scale,
                              c10::optional<torch::Tensor> v_scale);
// block_linear_cpu.cpp
torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind);
// layer_ops_cpu.cpp
std::tuple<torch::Tensor, torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                                  c10::optional<torch::Tensor> residual);
std::tuple<torch::Tensor, torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                              torch::Tensor cos_sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping, c10::optional<torch::Tensor> k_scale,
              c10::optional<torch::Tensor> v_scale);
// kv_quant_cpu.cpp: int8 / float8_e4m3fn caches with float16 scales per (token, kv-head)
void check_quantized_cache(const torch::Tensor& cache, const torch::Tensor& scales, const char* name);
void store_kv_quantized(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor k_scale, torch::Tensor v_scale, const int64_t* slots);
void decode_quantized(const float* q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& k_scale, const torch::Tensor& v_scale, const int64_t* table, int64_t len,
                      int64_t group, float scale, float* out);
torch::Tensor gather_dequantized(const torch::Tensor& cache, const torch::Tensor& scales, const torch::Tensor& table,
                                 int64_t len);
// sampling_cpu.cpp
std::tuple<torch::Tensor, torch::Tensor> argmax_logsumexp(torch::Tensor logits);
// decoder_layers_cpu.cpp: the DecoderLayers class, bound into `m`
void bind_decoder_layers(py::module& m);
