// The CPU kernels of pdserve as one Python extension module (kernels/cpu_extension.py).
#include <torch/extension.h>

#include <string>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale);
torch::Tensor block_linear(torch::Tensor x, torch::Tensor blocks, const std::string& kind);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over a mixed batch (CPU, float32)");
  m.def("block_linear", &block_linear, "x @ W^T with W in GGUF blocks (CPU, float32)");
}
