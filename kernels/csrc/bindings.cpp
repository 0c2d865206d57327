// The CPU kernels of pdserve as one Python extension module (kernels/cpu_extension.py).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over a mixed batch (CPU, float32; int8/fp8 KV)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("query_start"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("block_linear", &block_linear, "x @ W^T with W in GGUF blocks (CPU, float32)");
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add (CPU, float32)");
  m.def("rope", &rope, "rotary position embedding of q and k, NeoX layout (CPU, float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection (CPU, float32)");
  m.def("store_kv", &store_kv, "write K/V rows into their paged cache slots (CPU, float32; int8/fp8 KV)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("argmax_logsumexp", &argmax_logsumexp, "per row of logits: first argmax and logsumexp (CPU, float32)");
  bind_decoder_layers(m);  // DecoderLayers: a decoder's layers as one call (CPU, float32)
}
