"""Paged decode attention on a GPU: achieved bandwidth vs the device's own copy bandwidth,
and speed vs torch SDPA on the same KV already gathered into contiguous tensors.

Both peers are measured in the same run on the same GPU:
  - copy: `dst.copy_(src)` of 1 GiB, counting bytes read + written;
  - SDPA: `F.scaled_dot_product_attention` (enable_gqa) on [B, KVH, L, D] K/V (the gather
    that builds them is not timed, which favours SDPA).
Our kernel reads K/V through scattered block tables (a random permutation of the pool).
Bytes counted for attention: K and V of every context position, q, and the output.
Targets: >= 70% of copy bandwidth at contexts >= 4k; >= 2x SDPA.

    python bench/kernel_decode_attention.py [--heads 32 --kv-heads 8 --head-dim 128]
        [--page-size 16] [--batches 1,4,16,64] [--contexts 1024,4096,16384,32768]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

from pdserve.kernels.decode_attention import decode_attention


def bench_ms(fn) -> float:
    """Median milliseconds per call, L2 flushed between calls (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def measure(batch, context, heads, kv_heads, head_dim, page_size, dtype, generator):
    pages = -(-context // page_size)
    num_blocks = batch * pages
    shape = (num_blocks, page_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    tables = torch.randperm(num_blocks, generator=generator).view(batch, pages).cuda()
    seq_lens = torch.full((batch,), context, device="cuda")
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device="cuda")
    scale = head_dim ** -0.5
    ours_ms = bench_ms(partial(decode_attention, q, k_cache, v_cache, tables, seq_lens, scale))

    def gathered(cache):
        return cache[tables].reshape(batch, pages * page_size, kv_heads, head_dim)[:, :context] \
            .transpose(1, 2).contiguous()

    k = gathered(k_cache)
    del k_cache  # free the pool before the gathered copies take its place
    v = gathered(v_cache)
    del v_cache
    q4 = q.view(batch, heads, 1, head_dim)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * batch * context * kv_heads * head_dim + 2 * batch * heads * head_dim) * itemsize
    return ours_ms, sdpa_ms, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_decode_attention: no CUDA device, nothing measured. This benchmark "
              "compares a GPU kernel with the GPU's copy bandwidth; run it on a GPU.")
        return 0
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    print(f"heads {args.heads}/{args.kv_heads} kv, head_dim {args.head_dim}, page {args.page_size}, "
          f"{args.dtype}")
    print(f"{'batch':>5} {'context':>7} {'ours us':>9} {'GB/s':>7} {'of copy':>8} "
          f"{'sdpa us':>9} {'vs sdpa':>8}")
    g = torch.Generator().manual_seed(0)
    long_fractions, speedups = [], []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            ours_ms, sdpa_ms, nbytes = measure(batch, context, args.heads, args.kv_heads,
                                               args.head_dim, args.page_size, dtype, g)
            bw = nbytes / (ours_ms * 1e-3)
            speedup = sdpa_ms / ours_ms
            speedups.append(speedup)
            if context >= 4096:
                long_fractions.append(bw / copy_bw)
            print(f"{batch:5d} {context:7d} {ours_ms * 1e3:9.1f} {bw / 1e9:7.0f} {bw / copy_bw:7.0%} "
                  f"{sdpa_ms * 1e3:9.1f} {speedup:7.2f}x")
            torch.cuda.empty_cache()
    if long_fractions:
        print(f"worst fraction of copy bandwidth at context >= 4k: {min(long_fractions):.0%} "
              "(target >= 70%)")
    print(f"worst speedup over SDPA on gathered KV: {min(speedups):.2f}x (target >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
