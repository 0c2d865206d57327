"""The C++ per-layer CPU ops (kernels/cpu_layer_ops.py) against their PyTorch references.

Each must keep its reference's contract: RMSNorm with and without the fused residual,
RoPE on strided views of a fused QKV output at any position of the cache, silu(gate) * up
over the whole float range (its vectorised exp included), and the KV store with padding
slots. Float32 with other summation orders and a polynomial exp: agreement to a few ulps,
the store bit for bit. These are the CPU default: they must build here, never skip.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.activation import silu_mul_ref
from pdserve.kernels.cpu_layer_ops import rms_norm_cpu, rope_cpu, silu_mul_cpu, store_kv_cpu
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.rmsnorm import rms_norm_ref
from pdserve.kernels.rope import rope_cos_sin_cache, rope_ref
from pdserve.runtime.config import RopeScaling
from pdserve.runtime.rotary import rope_inv_freq


@pytest.mark.parametrize("rows", [1, 7, 200])  # 200 rows: the parallel path
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows, with_residual):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=generator) * 4
    weight = torch.randn(576, generator=generator)
    residual = torch.randn(rows, 576, generator=generator) if with_residual else None
    out, new_residual = rms_norm_cpu(x, weight, 1e-5, residual)
    expected_out, expected_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 1, 32)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rope_on_fused_qkv_views_matches_reference(heads, kv_heads, head_dim, tokens):
    generator = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    cache = rope_cos_sin_cache(rope_inv_freq(head_dim, 500000.0, scaling), 4096)
    positions = torch.randint(0, 4096, (tokens,), generator=generator)
    positions[0] = 4095  # the last row of the cache
    q_out, k_out = rope_cpu(q, k, positions, cache)
    q_ref, k_ref = rope_ref(q, k, positions, cache)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)


def test_rope_rejects_positions_outside_the_cache():
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    cache = rope_cos_sin_cache(rope_inv_freq(64, 10000.0, RopeScaling()), 16)
    with pytest.raises(RuntimeError, match="outside the RoPE cache"):
        rope_cpu(q, k, torch.tensor([3, 16]), cache)


@pytest.mark.parametrize("rows,width", [(1, 1536), (8, 37), (64, 1536)])
def test_silu_mul_matches_reference(rows, width):
    generator = torch.Generator().manual_seed(width)
    gate_up = torch.randn(rows, 2 * width, generator=generator) * 8
    # exp's edges: far below its underflow, at it, zero, large positive gates.
    edges = torch.tensor([-1000.0, -100.0, -87.4, -87.3, -20.0, 0.0, 1e-8, 30.0, 88.0, 1000.0])
    n = min(width, edges.numel())
    gate_up[0, :n] = edges[:n]
    torch.testing.assert_close(silu_mul_cpu(gate_up), silu_mul_ref(gate_up), atol=1e-6, rtol=2e-6)


def test_store_kv_writes_the_slots_and_skips_padding():
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 9 * 64, generator=generator)
    k = qkv[:, 3 * 64: 6 * 64].view(6, 3, 64)  # strided views, as the layers pass them
    v = qkv[:, 6 * 64:].view(6, 3, 64)
    slots = torch.tensor([0, 17, -1, 31, 32, 79])
    caches = [torch.zeros(5, 16, 3, 64) for _ in range(4)]
    store_kv_cpu(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="outside the cache"):
        store_kv_cpu(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 4, 80]))
