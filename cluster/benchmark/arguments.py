"""The serving benchmark's flags, shared by `pdserve bench serve` and bench/serving.py:
`add_benchmark_flags` puts them on a parser and `check_args` resolves every default, a
--workload preset's values included (a flag given explicitly wins over the preset), or
exits with a usage error that names the flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from urllib.parse import urlsplit

from pdserve.cluster.benchmark.chat import PRESETS
from pdserve.cluster.benchmark.flavors import FLAVORS
from pdserve.cluster.benchmark.launch import default_serve_command
from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL

DESCRIPTION = ("Online serving benchmark: an OpenAI-compatible endpoint driven over HTTP, as "
               "`vllm bench serve`, optionally beside a peer server")
DEFAULT_COMPARE = ("--prefill-workers 1 --decode-workers 1", "--colocated --decode-workers 2")
DEFAULT_COMPARE_LABELS = ("disagg", "colocated")
DEFAULT_NUM_PROMPTS = 100
DEFAULT_LONG_FRACTION = 0.2  # --dataset mixed; a --workload brings its own


def slo_ms(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"an SLO is a positive number of ms or 'none', got {text}")
    return value


def positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (those say in words what they default to),
    and the description and epilog with their own line breaks (examples stay one a line)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def add_target_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", "--base-url", dest="base_url",
                       help="a running pdserve or any OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", metavar="ARGS", nargs="?", const="",
                       help="start `pdserve serve ARGS` for the run (alone: its defaults)")
    where.add_argument("--compare", nargs="*", metavar="ARGS",
                       help="two quoted `pdserve serve` argument strings, run one after the other; "
                       f"alone: {' vs '.join(repr(a) for a in DEFAULT_COMPARE)}")
    p.add_argument("--labels", nargs=2, help="names of the two --compare servers")
    p.add_argument("--flavor", choices=sorted(FLAVORS), default="pdserve",
                   help="the --url server's extra fields that make it produce exactly max_tokens tokens "
                   "(openai: none, so output lengths may vary); also its label in the output")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="sets the vocabulary and counts chat tokens; passed to launched servers")
    p.add_argument("--api-key", help="sent as a bearer token; passed to launched servers")
    p.add_argument("--serve-command", default=default_serve_command(), help="what --launch runs")
    p.add_argument("--server-timeout", type=float, default=300.0, help="s to wait for /health")
    p.add_argument("--server-stop-timeout", type=float, default=30.0, help="s from SIGINT to SIGKILL")
    p.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    p.add_argument("--warmup-requests", type=positive(int), default=3, help="per server, not counted")
    peer = p.add_argument_group("peer (the same requests on the same schedule, after pdserve)")
    peer.add_argument("--peer-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8100")
    peer.add_argument("--peer-name", default="peer", help="its label in the output")
    peer.add_argument("--peer-flavor", choices=sorted(FLAVORS), default="vllm",
                      help="which extra fields make it produce exactly max_tokens tokens")
    peer.add_argument("--peer-api-key", help="sent to the peer as a bearer token")


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dataset", choices=("random", "shared-prefix", "mixed"),
                      help="token-id prompts to /v1/completions (default: random, unless --workload)")
    what.add_argument("--workload", choices=sorted(PRESETS),
                      help="chat prompts to /v1/chat/completions: " + "; ".join(
                          f"{name}: {p.num_prompts} chats, {round(100 * p.long_fraction)}%% long, concurrency "
                          f"{p.max_concurrency}" for name, p in PRESETS.items()))
    p.add_argument("--num-prompts", type=positive(int),
                   help=f"requests per run (default: the workload's, else {DEFAULT_NUM_PROMPTS})")
    p.add_argument("--seed", type=int, default=0, help="fixes the prompts and the arrival schedule")
    p.add_argument("--random-output-len", "--output-len", dest="output_len", type=positive(int), default=64,
                   help="output tokens per request (every dataset and workload)")
    p.add_argument("--random-input-len", type=positive(int), default=256, help="random: prompt tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: input and output lengths uniform in [L*(1-r), L*(1+r)]")
    p.add_argument("--prefix-len", type=positive(int), default=1024, help="shared-prefix: common tokens")
    p.add_argument("--suffix-len", type=positive(int), default=64, help="shared-prefix: own tokens")
    p.add_argument("--num-groups", type=positive(int), default=8, help="shared-prefix: distinct prefixes")
    p.add_argument("--long-fraction", type=float,
                   help=f"mixed: share of long prompts (default: the workload's, else {DEFAULT_LONG_FRACTION})")
    p.add_argument("--long-len", type=positive(int), default=1500, help="mixed: long prompt tokens (at most)")
    p.add_argument("--short-min-len", type=positive(int), default=64, help="--dataset mixed: short min")
    p.add_argument("--short-max-len", type=positive(int), default=256, help="--dataset mixed: short max")
    p.add_argument("--request-rate", type=positive(float), default=math.inf, help="req/s; inf: all at once")
    p.add_argument("--burstiness", type=positive(float), default=1.0, help="1: Poisson; gamma otherwise")
    p.add_argument("--max-concurrency", type=positive(int),
                   help="requests in flight at most (default: the workload's, else no limit); with "
                   "--request-rate inf a closed loop")


def add_benchmark_flags(p: argparse.ArgumentParser, result_json_default: str) -> None:
    """Every flag of a serving benchmark run; `result_json_default` says in words where the
    JSON goes without --result-json."""
    add_target_flags(p)
    add_workload_flags(p)
    p.add_argument("--slo-ttft-ms", type=slo_ms, default=2000.0, help="'none' to drop")
    p.add_argument("--slo-tpot-ms", type=slo_ms, default=100.0, help="'none' to drop")
    p.add_argument("--slo-e2el-ms", type=slo_ms, default=None, help="E2E latency SLO")
    p.add_argument("--target-itl-ratio", type=float, default=0.5, help="--compare: p99 ITL A/B at most")
    p.add_argument("--target-goodput-ratio", type=float, default=1.3, help="--compare: goodput A/B at least")
    p.add_argument("--result-json", metavar="PATH",
                   help="where to write the config, metrics and per-request records (default: "
                   f"{result_json_default}); an existing file is never overwritten (NAME-2.json ...)")
    p.add_argument("--plot", metavar="PATH",
                   help="also draw the latency distributions and throughputs of every run into this PNG "
                   "(needs matplotlib: pip install 'pdserve[bench]')")


def resolve_workload(args: argparse.Namespace) -> None:
    """Fill the workload's defaults in: a preset's, then the general ones."""
    preset = PRESETS.get(args.workload)
    if args.dataset is None and preset is None:
        args.dataset = "random"
    if args.num_prompts is None:
        args.num_prompts = preset.num_prompts if preset else DEFAULT_NUM_PROMPTS
    if args.long_fraction is None:
        args.long_fraction = preset.long_fraction if preset else DEFAULT_LONG_FRACTION
    if args.max_concurrency is None and preset:
        args.max_concurrency = preset.max_concurrency


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the workload's defaults filled in and the --compare labels set; a usage
    error (SystemExit 2, through `parser`) for flags that do not go together."""
    resolve_workload(args)
    if args.base_url is not None:
        url = urlsplit(args.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            parser.error(f"--url must be an http:// or https:// address such as http://127.0.0.1:8000, "
                         f"got {args.base_url!r}")
    elif args.flavor != "pdserve":
        parser.error("--flavor describes a --url server: a launched server is pdserve")
    if args.compare is not None:
        if not args.compare:
            args.compare = list(DEFAULT_COMPARE)
            args.labels = args.labels or list(DEFAULT_COMPARE_LABELS)
        if len(args.compare) != 2:
            parser.error(f"--compare takes two quoted server argument strings, got {len(args.compare)}")
        args.labels = args.labels or ["A", "B"]
    if args.peer_url:
        args.peer_url = args.peer_url.rstrip("/")
    if not 0 <= args.random_range_ratio < 1:
        parser.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if not 0 <= args.long_fraction <= 1:
        parser.error(f"--long-fraction must be in [0, 1], got {args.long_fraction}")
    if args.short_min_len > args.short_max_len:
        parser.error("--short-min-len must not exceed --short-max-len")
    return args
