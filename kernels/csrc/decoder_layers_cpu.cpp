// A Llama-family decoder's layers as one C++ call per forward on the CPU (float32; the KV
// pool float32, or int8 / float8_e4m3fn with scales).
//
// Each layer is the sequence of DecoderLayer.forward (runtime/models/llama.py) over the
// kernels of this extension: RMSNorm (+ residual), QKV projection, RoPE, KV store, paged
// attention, output projection, RMSNorm (+ residual), gate/up projection, silu * up, down
// projection. The arithmetic is the same calls in the same order as the Python layers
// with the "cpu" kernels, so both give bit-identical results; what goes is the Python
// between them (module calls, views, splits), a few ms per step at decode batch sizes.
//
// The weights are held from construction (the tensors of the model's parameters and
// buffers, shared, never copied); the KV pool and the batch come with each call.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

// One linear layer as models/llama.py's Linear computes it: from its GGUF blocks for up to
// `max_block_rows` rows when it has them, else the dense weight; from the blocks for any
// number of rows when it has no dense weight (quantized models keep none).
struct LinearWeights {
  torch::Tensor weight;  // [out, in] (any layout); undefined when the layer keeps blocks only
  c10::optional<torch::Tensor> bias;
  c10::optional<torch::Tensor> blocks;  // [out, in / 32, bytes] uint8
  std::string kind;

  torch::Tensor operator()(const torch::Tensor& x, int64_t max_block_rows) const {
    if (blocks.has_value() && (!weight.defined() || x.size(0) <= max_block_rows)) {
      auto y = block_linear(x, *blocks, kind);
      return bias.has_value() ? y.add_(*bias) : y;
    }
    return at::linear(x, weight, bias);
  }
};

LinearWeights linear_from(const py::tuple& t) {
  TORCH_CHECK(t.size() == 4, "a linear layer is (weight, bias, blocks, kind)");
  LinearWeights w;
  if (!t[0].is_none()) w.weight = t[0].cast<torch::Tensor>();
  if (!t[1].is_none()) w.bias = t[1].cast<torch::Tensor>();
  if (!t[2].is_none()) {
    w.blocks = t[2].cast<torch::Tensor>();
    w.kind = t[3].cast<std::string>();
  }
  TORCH_CHECK(w.weight.defined() || w.blocks.has_value(), "a linear layer needs a dense weight or blocks");
  return w;
}

struct LayerWeights {
  torch::Tensor input_norm, post_attention_norm;
  LinearWeights qkv, o, gate_up, down;
};

}  // namespace

class DecoderLayers {
 public:
  // layers: per layer (input_norm, qkv, o, post_attention_norm, gate_up, down), each
  // linear as (weight or None, bias or None, blocks or None, kind or None).
  DecoderLayers(const py::list& layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                double scale, int64_t max_block_rows)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
        max_block_rows_(max_block_rows) {
    for (const auto& item : layers) {
      auto t = item.cast<py::tuple>();
      TORCH_CHECK(t.size() == 6, "a layer is (input_norm, qkv, o, post_attention_norm, gate_up, down)");
      layers_.push_back({t[0].cast<torch::Tensor>(), t[3].cast<torch::Tensor>(), linear_from(t[1].cast<py::tuple>()),
                         linear_from(t[2].cast<py::tuple>()), linear_from(t[4].cast<py::tuple>()),
                         linear_from(t[5].cast<py::tuple>())});
    }
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // Layers [first, last) over hidden states x [T, hidden] and the residual stream (None
  // before the first layer). kv: a pool [layers, 2, blocks, block_size, KVH, D] of at least
  // `last` layers (a layer-skip draft's pool holds only its first layers); scales: a
  // quantized pool's [layers, 2, blocks, block_size, KVH] float16 (None: float32 pool).
  // Writes each layer's K/V of the batch to its slots; returns (output, residual).
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                                   int64_t first, int64_t last, torch::Tensor kv,
                                                   torch::Tensor positions, torch::Tensor cos_sin,
                                                   torch::Tensor slot_mapping, torch::Tensor block_tables,
                                                   torch::Tensor query_start, torch::Tensor seq_lens,
                                                   c10::optional<torch::Tensor> scales) const {
    TORCH_CHECK(0 <= first && first <= last && last <= size(), "layers [", first, ", ", last, ") out of ", size());
    TORCH_CHECK(kv.dim() == 6 && kv.size(0) >= last && kv.size(1) == 2, "kv must be a pool [layers, 2, ...] of at least ",
                last, " layers");
    TORCH_CHECK(first == 0 || (residual.has_value() && residual->defined()),
                "a residual stream is needed after the first layer");
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    for (int64_t i = first; i < last; ++i) {
      const LayerWeights& w = layers_[i];
      auto [h, sum] = rms_norm(x, w.input_norm, eps_, residual);
      auto qkv = w.qkv(h, max_block_rows_);
      auto q = qkv.narrow(1, 0, q_size).view({-1, num_heads_, head_dim_});
      auto k = qkv.narrow(1, q_size, kv_size).view({-1, num_kv_heads_, head_dim_});
      auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({-1, num_kv_heads_, head_dim_});
      auto [q_rot, k_rot] = rope(q, k, positions, cos_sin);
      auto k_cache = kv.select(0, i).select(0, 0), v_cache = kv.select(0, i).select(0, 1);
      c10::optional<torch::Tensor> k_scale, v_scale;
      if (scales.has_value()) k_scale = scales->select(0, i).select(0, 0), v_scale = scales->select(0, i).select(0, 1);
      store_kv(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale);
      auto attended = paged_attention(q_rot, k_cache, v_cache, block_tables, query_start, seq_lens, scale_, k_scale,
                                      v_scale);
      auto [h2, sum2] = rms_norm(w.o(attended.view({-1, q_size}), max_block_rows_), w.post_attention_norm, eps_, sum);
      x = w.down(silu_mul(w.gate_up(h2, max_block_rows_)), max_block_rows_);
      residual = sum2;
    }
    return {x, residual.has_value() ? *residual : torch::Tensor()};
  }

 private:
  std::vector<LayerWeights> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  int64_t max_block_rows_;
};

void bind_decoder_layers(py::module& m) {
  py::class_<DecoderLayers>(m, "DecoderLayers")
      .def(py::init<const py::list&, int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("__len__", &DecoderLayers::size)
      // The GIL is released around the layers: nothing in them touches Python objects.
      .def("forward", &DecoderLayers::forward, py::arg("x"), py::arg("residual"), py::arg("first"),
           py::arg("last"), py::arg("kv"), py::arg("positions"), py::arg("cos_sin"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("query_start"), py::arg("seq_lens"), py::arg("scales") = py::none(),
           py::call_guard<py::gil_scoped_release>());
}
