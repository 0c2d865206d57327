// The CPU kernels' entry points, each defined in its own source file (named below) and
// exposed to Python by bindings.cpp. All take float32 CPU tensors; see each definition.
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>

// paged_attention_cpu.cpp
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale);
// block_linear_cpu.cpp
torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind);
// layer_ops_cpu.cpp
std::tuple<torch::Tensor, torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                                  c10::optional<torch::Tensor> residual);
std::tuple<torch::Tensor, torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                              torch::Tensor cos_sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping);
// sampling_cpu.cpp
std::tuple<torch::Tensor, torch::Tensor> argmax_logsumexp(torch::Tensor logits);
// decoder_layers_cpu.cpp: the DecoderLayers class, bound into `m`
void bind_decoder_layers(py::module& m);
