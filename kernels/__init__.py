"""Triton kernels, C++ CPU kernels, and the PyTorch references they are checked against.

Each module holds a Triton kernel, its wrapper (which asserts shapes and strides) and a
PyTorch reference with the same signature and contract:

    decode_attention   decode_attention / decode_attention_ref   one query per sequence, split-K
    extend_attention   extend_attention / extend_attention_ref   new tokens over a paged prefix
    kv_store           store_kv / store_kv_ref                   scatter new K/V into pages
    kv_pack            pack_kv, unpack_kv / *_ref                pages <-> contiguous (exact copies)
    kv_quant           quantize_kv_ref, dequantize_kv_ref        an int8/fp8 KV cache's rows and scales
                                                                 (what store_kv and attention repeat)
    rmsnorm            rms_norm / rms_norm_ref                   with fused residual add
    rope               rope / rope_ref                           NeoX layout, scaled cos/sin cache
    attention          paged_attention_ref                       mixed-batch reference (no kernel)
    activation         silu_mul_ref                              gated MLP activation (no Triton kernel)

The C++ CPU kernels (csrc/, one extension built on first use by cpu_extension.py) keep
the same contracts for float32 on the CPU (the KV cache float32, or int8/fp8 with scales,
csrc/kv_quant_cpu.cpp):

    cpu_attention      paged_attention_cpu                       a mixed batch in one call
    cpu_layer_ops      rms_norm_cpu, rope_cpu, silu_mul_cpu, store_kv_cpu
    block_linear       block_linear / block_linear_ref           x @ W^T from GGUF blocks

The Triton wrappers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before triton was imported (tests); see triton_utils.INTERPRETED.
"""
