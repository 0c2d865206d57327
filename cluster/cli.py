"""The `pdserve` command line.

`pdserve generate` runs one prompt in-process and streams only the generated text to
stdout; progress and timing go to stderr so the text can be piped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_MODEL = "smollm2-135m-instruct"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, in this process")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"HuggingFace directory, .gguf file, or {DEFAULT_MODEL!r} (default)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    gen.add_argument("--max-tokens", type=_positive_int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 disables")
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--max-model-len", type=_positive_int, default=None,
                     help="cap the context length (default: the model's)")
    gen.add_argument("--threads", type=_positive_int, default=1,
                     help="torch threads; one per process is fastest on small machines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    return 2


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pdserve.decode_worker.engine import EngineCore
    from pdserve.runtime.loader import load_model
    from pdserve.runtime.sampling_params import SamplingParams
    from pdserve.runtime.stopping import FinishReason
    from pdserve.runtime.text_stream import TextStream

    torch.set_num_threads(args.threads)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
        )
        print(f"pdserve: loading {args.model} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        loaded = load_model(args.model, max_model_len=args.max_model_len)
        print(f"pdserve: loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        tokenizer = loaded.tokenizer
        if args.chat:
            prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
        engine = EngineCore(loaded.runner, loaded.info)
        engine.add_request("cli", prompt_ids, params)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2

    stream = TextStream(tokenizer, params, loaded.info.eos_token_ids)
    started = time.perf_counter()
    first_token_at = None
    num_tokens = 0
    finish_reason = None
    while finish_reason is None:
        for chunk in engine.step():
            num_tokens += len(chunk.token_ids)
            first_token_at = first_token_at or time.perf_counter()
            for token in chunk.token_ids:
                sys.stdout.write(stream.push(token))
            finish_reason = chunk.finish_reason
            if stream.stopped:
                engine.finish_request("cli", FinishReason.STOP)
                finish_reason = FinishReason.STOP
        sys.stdout.flush()
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - started
    decode_time = time.perf_counter() - (first_token_at or started)
    rate = (num_tokens - 1) / decode_time if num_tokens > 1 and decode_time > 0 else 0.0
    print(
        f"pdserve: {len(prompt_ids)} prompt tokens, {num_tokens} generated in {elapsed:.2f}s "
        f"(first token {1000 * ((first_token_at or started) - started):.0f} ms, "
        f"decode {rate:.1f} tok/s), finish reason: {finish_reason.value}",
        file=sys.stderr,
    )
    return 0
