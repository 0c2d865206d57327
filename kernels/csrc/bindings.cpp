// The CPU kernels of pdserve as one Python extension module (kernels/cpu_extension.py).
#include <torch/extension.h>

#include <string>
#include <tuple>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale);
torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind);
std::tuple<torch::Tensor, torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                                  c10::optional<torch::Tensor> residual);
std::tuple<torch::Tensor, torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                              torch::Tensor cos_sin);
torch::Tensor silu_mul(torch::Tensor gate_up);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping);
void bind_decoder_layers(py::module& m);
std::tuple<torch::Tensor, torch::Tensor> argmax_logsumexp(torch::Tensor logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over a mixed batch (CPU, float32)");
  m.def("block_linear", &block_linear, "x @ W^T with W in GGUF blocks (CPU, float32)");
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add (CPU, float32)");
  m.def("rope", &rope, "rotary position embedding of q and k, NeoX layout (CPU, float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection (CPU, float32)");
  m.def("store_kv", &store_kv, "write K/V rows into their paged cache slots (CPU, float32)");
  m.def("argmax_logsumexp", &argmax_logsumexp, "per row of logits: first argmax and logsumexp (CPU, float32)");
  bind_decoder_layers(m);  // DecoderLayers: a decoder's layers as one call (CPU, float32)
}
