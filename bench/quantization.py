"""Weights held quantized (`--quantization`): memory, decode speed and perplexity per mode, and
llama.cpp on the same GGUF file in the same run (`llama-cpp-python`, a bench extra: `pip
install llama-cpp-python`, ~7 minutes to build here).

Each configuration runs in a fresh process pinned to the same cores with the same thread
count: SmolLM2-135M-Instruct from the embedded Q4_1 GGUF,

    none    dense float32 weights (dequantized from the file)
    auto    the default: the file's blocks for small batches, dense for large
    gguf    the file's blocks only (no dense copy)
    int8    int8 (Q8_0) blocks made at load from the dense weights
    llama.cpp   the same file as stored
    gguf-kv8    (--modes gguf-kv8) gguf with the KV cache in int8 too (--kv-cache-dtype int8):
                the whole worker quantized
    gguf-act8   (--modes gguf-act8) gguf with every linear layer computed as llama.cpp's CPU
                matmul does, activations quantized to 8 bits per 32: a diagnostic of where the
                greedy tokens part (agreement only)

and reports the process's resident memory after loading (psutil RSS, split into anonymous
and file-backed pages, and the peak while loading), one stream's decode rate (tokens
after the first, greedy, past EOS), the output rate of 8 streams at once (llama.cpp: the
same 8 requests one after another, as its Python binding serves them), perplexity over
tests/data/perplexity_text.txt and, against llama.cpp, how many of the first 32 greedy
tokens agree on a set of chat prompts, prompt by prompt.

Two more fresh processes measure what no weight mode can go below: `imports` (the
interpreter with torch and pdserve imported, nothing loaded) and `metadata` (the GGUF's
config and tokenizer read, no weights).

`--agreement-floor` measures instead how far greedy agreement falls when nothing but the
arithmetic changes: llama.cpp's greedy tokens on the same prompts, 32 tokens, each in a fresh
process, under its default settings (float16 KV cache, --threads threads, n_batch 512) and
variants that change one thing (the same settings again, float32 KV cache, another thread
count, the prompt fed 8 tokens at a time, flash attention), each against the default; then
pdserve `gguf` against every llama.cpp variant and pdserve `none` (dense float32) against
`gguf`. Only the agreement is printed.

    python bench/quantization.py [--threads 2] [--tokens 128] [--modes none auto gguf int8]
                                 [--skip-timing] [--kv-blocks 256] [--agreement-floor]
                                 [--requantize q4_0|q8_0]

`--requantize` runs it all on a copy of the file whose Q4_1 matrices are requantized to
another GGML type (pdserve and llama.cpp on the same copy): the other block formats
against the same oracle.

`--skip-timing` leaves out the decode rates (the correctness and memory parts only: they
mean the same on a busy machine, timings do not).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, smollm2_gguf

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity_text.txt"
PERPLEXITY_TOKENS = 1024
PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how tides work to a ten-year-old.", "List five uses for a paperclip.",
           "What is the difference between weather and climate?", "Describe the taste of bread.",
           "Give three tips for learning a new language.", "Why is the sky blue?",
           "Write a haiku about autumn."]
AGREEMENT_TOKENS = 32
ACT8_MODE = "gguf-act8"  # --modes: gguf with llama.cpp's 8-bit activations emulated (agreement only)
KV8_MODE = "gguf-kv8"  # --modes: gguf with an int8 KV cache
REQUANTIZE_TYPES = ("q4_0", "q8_0")  # --requantize: GGML types


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _memory() -> dict[str, float]:
    """RSS now, its anonymous and file-backed parts, and the peak RSS so far (VmHWM: unlike
    getrusage's ru_maxrss it does not carry the parent's peak over exec), in MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": _rss_mib(), "anon_mib": fields.get("RssAnon", math.nan),
            "file_mib": fields.get("RssFile", math.nan), "peak_mib": fields.get("VmHWM", math.nan)}


def _pin(threads: int) -> None:
    import torch

    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def _floor(what: str, model: str, threads: int, timing: bool, kv_blocks: int, results) -> None:
    """What a process holds before any weight: `imports` (what `_pdserve` imports) or
    `metadata` (plus the GGUF's config and tokenizer)."""
    _pin(threads)
    from pdserve.engine.engine import EngineCore  # noqa: F401 - as _pdserve imports it
    from pdserve.runtime.loader import load_model  # noqa: F401
    from pdserve.runtime.weights.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model) if what == "metadata" else None
    if checkpoint is not None:
        from pdserve.runtime.model_runner import _release_freed_memory

        _release_freed_memory()  # as load_model does at its end
    results.put({"mode": what, **_memory(), "weight_mib": 0.0, "describe": {
        "imports": "interpreter, torch and pdserve imported; nothing loaded",
        "metadata": "+ GGUF config and tokenizer read (no weights)"}[what]})


def _act8_block_linear(x, blocks, kind: str):
    """x @ W^T as llama.cpp's CPU matmul computes it from the same blocks: x quantized per
    block of 32 to 8 bits (d = max|x| / 127, q = round half away from zero, d kept as
    float16: Q8_1 beside q4_1 weights, whose offset term uses the block's float16 sum
    d * sum(q); Q8_0 beside q8_0), integer dot products scaled per block. A diagnostic of
    where greedy tokens part from llama.cpp's, not a kernel."""
    import torch

    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1) / 127
    safe = torch.where(d > 0, d, 1.0)[..., None]
    q = xb / safe
    q = torch.where(d[..., None] > 0, torch.sign(q) * torch.floor(q.abs() + 0.5), 0.0)
    scale = blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0][None] * d.half().float()[:, None, :]
    if kind == "q4_1":
        qs = blocks[..., 4:].int()
        weights = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()
        offset = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        sums = (d * q.sum(-1)).half().float()
        return ((torch.einsum("nbk,mbk->mnb", weights, q) * scale).sum(-1) + sums @ offset.T).to(x.dtype)
    weights = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (torch.einsum("nbk,mbk->mnb", weights, q) * scale).sum(-1).to(x.dtype)


def _pdserve(mode: str, model: str, threads: int, timing: bool, kv_blocks: int, tokens: int, results) -> None:
    _pin(threads)
    import torch  # noqa: F401

    from pdserve.engine.engine import EngineCore
    from pdserve.runtime.config import CacheConfig, DeviceConfig, SchedulerConfig
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.perplexity import perplexity
    from pdserve.runtime.sampling_params import SamplingParams

    act8 = mode == ACT8_MODE  # gguf, its linear layers computed as llama.cpp does (Python layers)
    if act8:
        from pdserve.runtime import models

        models.llama.block_linear = _act8_block_linear
        timing = False
    baseline = _rss_mib()  # the interpreter, torch and pdserve imported; nothing loaded
    started = time.perf_counter()
    quantization = "gguf" if mode in (ACT8_MODE, KV8_MODE) else mode
    loaded = load_model(model, cache=CacheConfig(num_blocks=kv_blocks,
                                                          kv_cache_dtype="int8" if mode == KV8_MODE else "auto"),
                        device_config=DeviceConfig(device="cpu", quantization=quantization,
                                                   kernels="reference" if act8 else "auto"))
    load_s = time.perf_counter() - started
    memory = _memory()
    kv_mib = loaded.runner.pool.nbytes / 2**20  # values, and an int8 pool's scales
    tokenizer = loaded.tokenizer
    prompts = _chat_prompts(tokenizer)

    def run(batch: list[list[int]], max_tokens: int, ignore_eos: bool = True):
        engine = EngineCore(loaded.runner, loaded.info, SchedulerConfig(), enable_prefix_caching=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        for index, prompt in enumerate(batch):
            engine.add_request(str(index), prompt, params)
        stamps, out = [], {}
        while engine.has_unfinished:
            for delta in engine.step():
                stamps.append(time.perf_counter())
                out.setdefault(int(delta.request_id), []).extend(delta.token_ids)
        return stamps, out

    rates = {"single": float("nan"), "concurrent8": float("nan")}
    if timing:
        run(prompts[:1], 8)  # warm-up
        single = []
        for _ in range(3):
            stamps, _ = run(prompts[:1], tokens)
            single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        started = time.perf_counter()
        _, out = run(prompts, tokens)
        rates = {"single": statistics.median(single),
                 "concurrent8": sum(len(ids) for ids in out.values()) / (time.perf_counter() - started)}
    _, greedy = run(prompts, AGREEMENT_TOKENS, ignore_eos=False)
    describe = loaded.runner.describe() + (", activations quantized to 8 bits as llama.cpp does" if act8 else "")
    results.put({"mode": mode, "describe": describe, "load_s": load_s, **memory,
                 "baseline_mib": baseline, "kv_mib": kv_mib,
                 "weight_mib": loaded.runner.weight_bytes() / 2**20, **rates,
                 # (act8: [tokens, vocab, blocks] products would not fit; its agreement is the point)
                 "perplexity": math.nan if act8 else perplexity(loaded.runner, _text_tokens(tokenizer)),
                 "greedy": [greedy[i] for i in range(len(prompts))]})


def _chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def _text_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:PERPLEXITY_TOKENS]


def _llama_cpp(model: str, threads: int, timing: bool, kv_blocks: int, tokens: int, results) -> None:
    _pin(threads)
    import numpy as np
    from llama_cpp import Llama

    from pdserve.runtime.perplexity import perplexity_from_logits
    from pdserve.runtime.weights.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(model).tokenizer  # the same token ids on both sides
    started = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    load_s = time.perf_counter() - started
    memory = _memory()
    prompts = _chat_prompts(tokenizer)

    def greedy(prompt: list[int], count: int, stop_at_eos: bool) -> tuple[list[int], list[float]]:
        return _llama_greedy(llm, prompt, count, stop_at_eos)

    rates = {"single": float("nan"), "concurrent8": float("nan")}
    if timing:
        greedy(prompts[0], 8, False)  # warm-up
        single = []
        for _ in range(3):
            _, stamps = greedy(prompts[0], tokens, False)
            single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        started = time.perf_counter()
        made = sum(len(greedy(p, tokens, False)[0]) for p in prompts)
        rates = {"single": statistics.median(single), "concurrent8": made / (time.perf_counter() - started)}
    text = _text_tokens(tokenizer)
    llm.reset()
    llm.eval(text)
    perplexity = perplexity_from_logits(np.asarray(llm.scores[:len(text) - 1], dtype=np.float32), text)
    results.put({"mode": "llama.cpp", "describe": "llama-cpp-python, the file as stored", "load_s": load_s,
                 **memory, "weight_mib": os.path.getsize(model) / 2**20, **rates,
                 "perplexity": perplexity, "greedy": [greedy(p, AGREEMENT_TOKENS, True)[0] for p in prompts]})


def _llama_greedy(llm, prompt: list[int], count: int, stop_at_eos: bool) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy tokens after `prompt` (argmax of its logits, the prompt fed by
    `Llama.eval` in batches of n_batch) and when each came."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out, stamps = [], []
    for _ in range(count):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        stamps.append(time.perf_counter())
        if stop_at_eos and token == llm.token_eos():
            break
        llm.eval([token])
    return out, stamps


def _floor_variants(threads: int) -> dict[str, dict]:
    """--agreement-floor: llama.cpp's settings, the default first, then one change each
    (`threads` for n_threads and n_threads_batch and the cores pinned; `type_*` by the name
    of the llama_cpp constant)."""
    other = 1 if threads > 1 else 2
    return {"default": {}, "repeat": {}, "f32 KV": {"type_k": "GGML_TYPE_F32", "type_v": "GGML_TYPE_F32"},
            f"{other} thread{'s' if other > 1 else ''}": {"threads": other}, "n_batch 8": {"n_batch": 8},
            "flash attn": {"flash_attn": True}}


def _llama_cpp_greedy(variant: str, settings: dict, model: str, threads: int, results) -> None:
    """llama.cpp's greedy tokens on PROMPTS (AGREEMENT_TOKENS, up to EOS) as `_llama_cpp`
    makes them, under `settings` (one of `_floor_variants`), and the logits each prompt ends
    with (whether a setting changes the arithmetic at all)."""
    settings = dict(settings)
    threads = settings.pop("threads", threads)
    _pin(threads)
    import llama_cpp

    from pdserve.runtime.weights.checkpoint import load_checkpoint

    prompts = _chat_prompts(load_checkpoint(model).tokenizer)
    settings = {k: getattr(llama_cpp, v) if k.startswith("type_") else v for k, v in settings.items()}
    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False, **settings)
    greedy, logits = [], []
    for prompt in prompts:
        greedy.append(_llama_greedy(llm, prompt, AGREEMENT_TOKENS, True)[0])
        logits.append(llm.scores[len(prompt) - 1].copy())  # kept: logits_all
    results.put({"mode": variant, "greedy": greedy, "logits": logits})


def _agreement_floor(model: str, threads: int, kv_blocks: int) -> int:
    """--agreement-floor: each llama.cpp variant against llama.cpp's default, pdserve gguf
    against each variant, pdserve none against pdserve gguf."""
    import numpy as np

    variants = _floor_variants(threads)
    rows = {f"llama.cpp {name}": row for name, settings in variants.items()
            if (row := _in_child(_llama_cpp_greedy, name, settings, model, threads))}
    greedy = {name: row["greedy"] for name, row in rows.items()}
    for mode in ("gguf", "none"):  # no timing: load, perplexity, greedy
        if row := _in_child(_pdserve, mode, model, threads, False, kv_blocks, AGREEMENT_TOKENS):
            greedy[f"pdserve {mode}"] = row["greedy"]
    llama = [f"llama.cpp {name}" for name in variants]
    pairs = ([(name, llama[0]) for name in llama[1:]] + [("pdserve gguf", name) for name in llama]
             + [("pdserve none", "pdserve gguf")])
    print(f"settings: llama.cpp default = float16 KV, {threads} thread(s), n_batch 512, no flash attention; "
          f"each variant changes one")
    for ours, theirs in pairs:
        if ours in greedy and theirs in greedy:
            full, mean_prefix = _agreement(greedy[ours], greedy[theirs])
            prefixes = " ".join(f"{_agreeing_prefix(a, b):2d}" for a, b in zip(greedy[ours], greedy[theirs]))
            differ = ""
            if ours in rows and theirs in rows:  # llama.cpp against itself: the first token's logits
                gap = max(float(np.abs(a - b).max()) for a, b in zip(rows[ours]["logits"], rows[theirs]["logits"]))
                differ = f"; first-token logits differ by up to {gap:.3g}"
            print(f"{ours:20s} vs {theirs:20s}: greedy tokens agree on {full}/{len(PROMPTS)} prompts "
                  f"(mean agreeing prefix {mean_prefix:4.1f} of {AGREEMENT_TOKENS}); per prompt {prefixes}{differ}")
    return 0


def _requantized_copy(source: str, kind: str, path: str) -> str:
    """`source` written to `path` with every Q4_1 tensor requantized to GGML type `kind`
    from its dequantized weights (all metadata and other tensors as they are)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data, raw = np.asarray(tensor.data), tensor.tensor_type
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            weights = gguf.quants.dequantize(data, raw).reshape(int(tensor.shape[1]), int(tensor.shape[0]))
            data, raw = gguf.quants.quantize(weights.astype(np.float32), qtype), qtype
        writer.add_tensor(tensor.name, data, raw_dtype=None if raw == gguf.GGMLQuantizationType.F32 else raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _in_child(target, *args) -> dict | None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, results))
    child.start()
    try:
        deadline = time.monotonic() + 1800
        while True:  # a child that dies without a result is reported at once, not after the deadline
            try:
                return results.get(timeout=5)
            except queue.Empty:
                if not child.is_alive() or time.monotonic() > deadline:
                    try:  # it may have exited right after putting its result
                        return results.get(timeout=1)
                    except queue.Empty:
                        raise RuntimeError(f"no result (exit code {child.exitcode})") from None
    except Exception as exc:  # noqa: BLE001 - report and go on with the other configurations
        print(f"  {args[0] if args else target.__name__} failed: {exc}", file=sys.stderr)
        return None
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()


def _agreeing_prefix(ours: list[int], theirs: list[int]) -> int:
    n = 0
    while n < min(len(ours), len(theirs)) and ours[n] == theirs[n]:
        n += 1
    return n


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """Prompts whose greedy tokens agree in full (up to AGREEMENT_TOKENS or EOS), and the
    mean length of the agreeing prefix."""
    prefixes = [_agreeing_prefix(a, b) for a, b in zip(ours, theirs)]
    full = sum(n == min(len(a), len(b)) for n, a, b in zip(prefixes, ours, theirs))
    return full, statistics.mean(prefixes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--modes", nargs="+", default=["none", "auto", "gguf", "int8"],
                        help=f"--quantization modes, {KV8_MODE}: gguf with an int8 KV cache, and {ACT8_MODE}: gguf "
                             "with llama.cpp's 8-bit activations emulated")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--skip-timing", action="store_true",
                        help="memory, perplexity and greedy agreement only (no decode rates)")
    parser.add_argument("--kv-blocks", type=int, default=256, help="KV pool blocks of 16 tokens")
    parser.add_argument("--agreement-floor", action="store_true",
                        help="greedy agreement of llama.cpp with itself under changed arithmetic, and of "
                             "pdserve gguf and none with it (agreement only; needs llama-cpp-python)")
    parser.add_argument("--requantize", choices=REQUANTIZE_TYPES,
                        help="first write a copy of the SmolLM2 file with its Q4_1 matrices requantized to this GGML "
                             "type (gguf-py's quantizer, from the dequantized Q4_1 weights); run everything on it")
    args = parser.parse_args()
    if args.kv_blocks * 16 < PERPLEXITY_TOKENS:
        parser.error(f"--kv-blocks must hold the {PERPLEXITY_TOKENS} perplexity tokens: at least "
                     f"{PERPLEXITY_TOKENS // 16}")
    print(machine_line(args.threads))
    with tempfile.TemporaryDirectory() as scratch:
        model = smollm2_gguf()
        if args.requantize:
            model = _requantized_copy(model, args.requantize, os.path.join(scratch, "model.gguf"))
            print(f"model: SmolLM2-135M-Instruct with its Q4_1 matrices requantized to {args.requantize.upper()} "
                  f"({os.path.getsize(model) / 2**20:.1f} MiB)")
        return _run(args, model)


def _run(args, model: str) -> int:
    if args.agreement_floor:
        return _agreement_floor(model, args.threads, args.kv_blocks)
    common = (model, args.threads, not args.skip_timing, args.kv_blocks)
    floors = [row for what in ("imports", "metadata") if (row := _in_child(_floor, what, *common))]
    rows = [row for mode in args.modes if (row := _in_child(_pdserve, mode, *common, args.tokens))]
    peer = None
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            peer = _in_child(_llama_cpp, *common, args.tokens)
        except ImportError:
            print("llama.cpp peer: not installed (pip install -e '.[llamacpp]'); left out")
    if peer:
        rows.append(peer)
    print(f"{'config':10s} {'RSS MiB':>8s} {'anon':>6s} {'file':>6s} {'peak':>6s} {'weights MiB':>11s} "
          f"{'1 stream tok/s':>15s} {'8 streams tok/s':>16s} {'perplexity':>10s}  how")
    for row in floors + rows:
        print(f"{row['mode']:10s} {row['rss_mib']:8.0f} {row['anon_mib']:6.0f} {row['file_mib']:6.0f} "
              f"{row['peak_mib']:6.0f} {row['weight_mib']:11.0f} {row.get('single', math.nan):15.1f} "
              f"{row.get('concurrent8', math.nan):16.1f} {row.get('perplexity', math.nan):10.3f}  {row['describe']}")
    by_mode = {row["mode"]: row for row in floors + rows}
    if "none" in by_mode:
        none = by_mode["none"]
        before = by_mode.get("metadata", by_mode.get("imports"))
        for mode in ("auto", "gguf", "int8", KV8_MODE):
            if mode in by_mode:
                row = by_mode[mode]
                # The floor: what a process holds with the metadata read (or torch and
                # pdserve imported) and no weights, plus the KV pool and the weights themselves.
                base = before["rss_mib"] if before else row["baseline_mib"]
                floor = (base + row["kv_mib"] + row["weight_mib"]) / none["rss_mib"]
                print(f"RSS {mode} / none: {row['rss_mib'] / none['rss_mib']:.2f}x, peak "
                      f"{row['peak_mib'] / none['peak_mib']:.2f}x (floor {floor:.2f}x: {base:.0f} MiB before any "
                      f"weight, KV pool {row['kv_mib']:.0f} MiB, weights {row['weight_mib']:.0f} MiB); "
                      f"perplexity {mode} / none: {row['perplexity'] / none['perplexity']:.4f}")
    if peer:
        for mode in ("auto", "gguf", "int8", KV8_MODE, ACT8_MODE):
            if mode in by_mode:
                row = by_mode[mode]
                full, mean_prefix = _agreement(row["greedy"], peer["greedy"])
                speed = (f"1 stream {row['single'] / peer['single']:.2f}x, 8 streams vs 8 sequential "
                         f"{row['concurrent8'] / peer['concurrent8']:.2f}x, ") if math.isfinite(row["single"]) else ""
                print(f"{mode} vs llama.cpp: {speed}perplexity {row['perplexity'] / peer['perplexity']:.4f}x, "
                      f"greedy tokens agree on {full}/{len(PROMPTS)} prompts (mean agreeing prefix "
                      f"{mean_prefix:.1f} of {AGREEMENT_TOKENS})")
                for prompt, ours, theirs in zip(PROMPTS, row["greedy"], peer["greedy"]):
                    print(f"    {_agreeing_prefix(ours, theirs):2d}/{min(len(ours), len(theirs)):2d} "
                          f"tokens agree  {prompt[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
