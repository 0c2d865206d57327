"""The `pdserve` command line.

`pdserve serve` runs the cluster: a local Ray on 127.0.0.1 by default (`--address` joins
an existing one), prefill and decode workers as Ray actors, and the gateway (OpenAI HTTP
and gRPC) in this process. It prints where it listens once every worker is ready; Ctrl-C
stops everything, local Ray included.

`pdserve generate` runs one prompt in-process and streams only the generated text to
stdout; progress and timing go to stderr so the text can be piped.

`pdserve serve` on an address other than loopback (127.0.0.0/8, ::1, localhost) needs an API
key (`--api-key` or $PDSERVE_API_KEY): without one it refuses to start, before Ray or any
server does, unless `--allow-unauthenticated` says the open API is meant (then it warns).

`--threads` (both commands; see `pdserve.runtime.threads`): `auto`, the default, gives
each worker an equal share of the cores this process may use and pins it there with one
torch thread per core; N gives each worker N threads pinned to N cores (shared when there
are fewer). The `serve` process itself (the gateway) runs torch on one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import sys
import time

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _threads(text: str) -> int | str:
    from pdserve.runtime.threads import parse_threads

    try:
        return parse_threads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto' (one thread per core the "
                                         f"worker is pinned to), got {text!r}") from None


THREADS_HELP = ("torch threads per worker: 'auto' (default) gives each worker an equal share of this "
                "process's cores, pinned, one thread per core; N: N threads pinned to N cores")
QUANTIZATION_HELP = ("how weights are held: auto (CPU: a GGUF file's blocks for small batches, dense float32 "
                     "for large ones; CUDA: dense), none (dense), gguf or q4 (the GGUF file's own blocks for every "
                     "batch, no dense copy: the least memory), int8 (every weight quantized at load to int8 "
                     "blocks, from any checkpoint), fp8 (FP8 weight blocks, CUDA only)")
KV_CACHE_DTYPE_HELP = ("how the KV cache is stored: auto (the model's dtype), int8 or fp8 (float8_e4m3fn), "
                       "quantized with one scale per token and KV head: ~3.9x the tokens of float32 in the "
                       "same --kv-cache-memory; prefill and decode workers use the same")


def build_parser() -> argparse.ArgumentParser:
    from pdserve.runtime.config import KV_CACHE_DTYPES, QUANTIZATIONS
    from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_bench_parser(sub)
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
    gen.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    gen.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help=QUANTIZATION_HELP)
    gen.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    gen.add_argument("--ignore-eos", action="store_true",
                     help="generate exactly --max-tokens tokens, past end of sequence (for timing runs)")
    return parser


def _add_serve_parser(sub) -> None:
    from pdserve.cluster.control.router import POLICIES
    from pdserve.cluster.gateway.frontend import DEFAULT_MAX_REQUEST_BYTES
    from pdserve.cluster.gateway.request_record import LOG_FORMATS
    from pdserve.kv_transfer.transports.base import KINDS
    from pdserve.runtime.config import KV_CACHE_DTYPES, QUANTIZATIONS
    from pdserve.runtime.weights.checkpoint import DEFAULT_MODEL

    serve = sub.add_parser("serve", help="run the cluster: workers on Ray, OpenAI HTTP and gRPC gateway")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"HuggingFace directory, .gguf file, or {DEFAULT_MODEL!r} (default)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    serve.add_argument("--prefill-workers", type=_non_negative_int, default=1)
    serve.add_argument("--decode-workers", type=_positive_int, default=1)
    serve.add_argument("--colocated", action="store_true",
                       help="no prefill workers: every decode worker prefills its own requests")
    serve.add_argument("--router", choices=sorted(POLICIES), default="prefix_aware")
    serve.add_argument("--local-prefill-tokens", type=_non_negative_int, default=32,
                       help="a decode worker prefills a request itself when at most this many prompt "
                            "tokens are not in its prefix cache")
    serve.add_argument("--spill-backlog-tokens", type=_non_negative_int, default=1024,
                       help="prompt tokens queued on a prefill worker from which a prompt that would "
                            "wait less on its decode worker is prefilled there (0: whenever it waits less)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_non_negative_int, default=8000, help="HTTP port (0: any free one)")
    serve.add_argument("--grpc-port", type=_non_negative_int, default=50051, help="gRPC port (0: any free one)")
    serve.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                       help="require this key (Bearer token / gRPC metadata); default $PDSERVE_API_KEY "
                            "(prefer it: arguments are visible to every user of the machine); empty is no key")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve without an API key on a non-loopback --host (refused otherwise): "
                            "anyone who can reach the address can use the API")
    serve.add_argument("--address", default=None,
                       help="join this Ray cluster (e.g. auto or ray://...) instead of starting a local one")
    serve.add_argument("--max-model-len", type=_positive_int, default=None)
    serve.add_argument("--block-size", type=_positive_int, default=16)
    serve.add_argument("--kv-cache-memory", type=_positive_int, default=512,
                       help="MiB of KV cache per worker")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=64)
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    serve.add_argument("--max-prefill-chunk", type=_positive_int, default=512)
    serve.add_argument("--decode-prefill-tokens", type=_positive_int, default=None,
                       help="prompt tokens a decode worker computes per step while it also decodes, "
                            "bounding the inter-token latency its local prefills add (default: 64 with "
                            "prefill workers, no limit with --colocated)")
    serve.add_argument("--prompt-deadline-factor", type=_non_negative_float, default=0.0, metavar="K",
                       help="order prompts by deadline on each worker: a prompt of L tokens falls due once "
                            "the worker has computed K x L prompt tokens since it arrived, and the earliest "
                            "due is computed first, --max-prefill-chunk prompt tokens per step in all "
                            "(short prompts overtake long ones by at most that); 0: first come, first served")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--max-queued-requests", type=_positive_int, default=256,
                       help="per worker: past this many queued requests, new ones get 429")
    serve.add_argument("--max-in-flight", type=_positive_int, default=1024,
                       help="gateway: past this many requests in flight, new ones get 429")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="gateway: HTTP bodies larger than this get 413 and gRPC messages "
                       "RESOURCE_EXHAUSTED, unread")
    serve.add_argument("--kv-transport", choices=KINDS, default=None,
                       help="force the KV transport (default: measure the candidates per worker pair at "
                       "start-up and take the fastest)")
    serve.add_argument("--transfer-timeout", type=float, default=30.0)
    serve.add_argument("--on-transfer-failure", choices=["recompute", "fail"], default="recompute")
    serve.add_argument("--tool-call-parser", choices=["hermes", "llama3"], default=None,
                       help="the format the model writes tool calls in (default: the one its chat template "
                            "uses; hermes when the template has no tool support, and pdserve then "
                            "describes the tools to the model itself)")
    serve.add_argument("--max-migrations", type=_non_negative_int, default=3,
                       help="times a request may move to another decode worker when its own is lost "
                            "(0: its stream ends with an error instead)")
    serve.add_argument("--engine-hang-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="a worker whose engine loop makes no progress for this long (a stuck step, a "
                            "dead thread) is replaced and its requests end with an error")
    serve.add_argument("--threads", type=_threads, default="auto", help=THREADS_HELP)
    serve.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help=QUANTIZATION_HELP)
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    serve.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                       help="export one OpenTelemetry trace per request over OTLP/gRPC to this collector "
                            "(e.g. 127.0.0.1:4317); without it nothing is traced")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="plain",
                       help="the access log's lines (one per request, logger pdserve.access): key=value or JSON")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the decoder layers at worker start-up (CPU; off by default: "
                            "slower in serving on small machines, see bench/results/engine_speed.md)")
    serve.add_argument("--device", default="auto",
                       help="where workers run the model: auto (CUDA when the worker sees a GPU), cpu, cuda[:N]")
    serve.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs each worker actor asks Ray for (1 on a GPU pool; Ray hides GPUs from "
                            "actors that ask for none)")
    scale = serve.add_argument_group("autoscaling (--prefill/--decode-workers are the start)")
    scale.add_argument("--autoscale", nargs="?", const="queue", choices=["queue", "slo"], default=None,
                       help="scale prefill and decode workers separately: queue (the default) by queue depth; "
                            "slo by predicted TTFT and TPOT against --ttft-slo and --tpot-slo (the planner also "
                            "sets the local-prefill threshold and a per-worker decode batch cap)")
    scale.add_argument("--ttft-slo", type=_positive_float, default=None, metavar="SECONDS",
                       help="with --autoscale slo: the time-to-first-token target")
    scale.add_argument("--tpot-slo", type=_positive_float, default=None, metavar="SECONDS",
                       help="with --autoscale slo: the time-per-output-token target")
    scale.add_argument("--shed-on-slo", action="store_true",
                       help="with --autoscale slo: refuse a request at once (429 with Retry-After) when its "
                            "predicted TTFT exceeds --ttft-slo, instead of answering late")
    scale.add_argument("--min-prefill", type=_non_negative_int, default=1)
    scale.add_argument("--max-prefill", type=_non_negative_int, default=4)
    scale.add_argument("--min-decode", type=_positive_int, default=1)
    scale.add_argument("--max-decode", type=_positive_int, default=4)
    scale.add_argument("--max-workers", type=_positive_int, default=None, metavar="N",
                       help="a budget: at most N prefill and decode workers together (the cores or GPUs "
                            "they share). Workers are then traded between the roles, drained from one before "
                            "they start in the other: by queue depth, to the role with the most load per "
                            "worker; with --autoscale slo, to the split whose predicted TTFT and TPOT are "
                            "nearest their targets (prefill workers may go to 0 with --min-prefill 0: decode "
                            "workers then prefill every prompt themselves)")
    scale.add_argument("--autoscale-prefill-tokens", type=_positive_int, default=4096,
                       help="pending prompt tokens per prefill worker before adding one")
    scale.add_argument("--autoscale-decode-waiting", type=_positive_int, default=4,
                       help="waiting requests per decode worker before adding one")
    scale.add_argument("--autoscale-window", type=float, default=10.0, help="seconds the signals are averaged over")
    scale.add_argument("--autoscale-up-cooldown", type=float, default=30.0)
    scale.add_argument("--autoscale-down-delay", type=float, default=60.0,
                       help="seconds the load must stay low before a worker is drained")
    scale.add_argument("--autoscale-down-cooldown", type=float, default=60.0)
    serve.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                       help="speculative decoding on the decode workers: ngram = prompt lookup, "
                            "draft = a draft model (--draft-model or --draft-layers)")
    serve.add_argument("--draft-model", default=None,
                       help="with --speculative draft: a smaller model of the same tokenizer "
                            "(HuggingFace directory or .gguf file)")
    serve.add_argument("--draft-layers", type=_positive_int, default=None,
                       help="with --speculative draft: self-draft with the model's first N layers "
                            "(shares its weights)")
    serve.add_argument("--num-speculative-tokens", type=_positive_int, default=3,
                       help="the most draft tokens per request and step (adapted to acceptance)")
    serve.add_argument("--speculative-max-batch", type=_positive_int, default=8,
                       help="speculate only while at most this many requests decode on a worker")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        return _bench(args)
    return 2


def is_loopback_host(host: str) -> bool:
    """True when `host` (a --host value) is reachable from this machine only: an address in
    127.0.0.0/8 (also IPv4-mapped), ::1, or the name localhost. Any other name may resolve to
    an outside interface, so it counts as reachable from the network."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_open_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> str | None:
    """The reason `pdserve serve` must not start, or None when it may.

    A gateway on a non-loopback `host` without an API key would answer anyone who can reach
    it: refused unless `allow_unauthenticated`, and then logged as a warning. A loopback
    bind or a non-empty key needs nothing."""
    if api_key or is_loopback_host(host):
        return None
    if not allow_unauthenticated:
        return (f"refusing to serve on {host!r} without an API key: anyone who can reach that address "
                f"could use the API. Set a key with --api-key KEY or the environment variable "
                f"PDSERVE_API_KEY, or pass --allow-unauthenticated to serve it open on purpose "
                f"(or bind --host 127.0.0.1)")
    logger.warning("SERVING WITHOUT AN API KEY on %s (--allow-unauthenticated): anyone who can reach "
                   "this address can send requests. Set --api-key or PDSERVE_API_KEY to require one.", host)
    return None


def _serve(args: argparse.Namespace) -> int:
    # Decided before anything starts (Ray, workers, servers): a refused bind never listens.
    api_key = args.api_key or None  # an empty key (e.g. PDSERVE_API_KEY="") is no key
    refusal = check_open_bind(args.host, api_key, args.allow_unauthenticated)
    if refusal is not None:
        print(f"pdserve: error: {refusal}", file=sys.stderr)
        return 2
    prepare_local_ray(args.address)  # first: the imports below import ray

    from pdserve.cluster.gateway.request_record import configure_access_log
    from pdserve.cluster.serve import GatewayConfig
    from pdserve.cluster.workers.spec import WorkerSpec
    from pdserve.runtime.config import ConfigError, SpeculativeConfig
    from pdserve.runtime.threads import use_one_thread

    configure_access_log(args.log_format)

    use_one_thread()  # the gateway tokenizes and serves HTTP; the workers own the cores
    num_prefill = 0 if args.colocated else args.prefill_workers
    try:
        speculative = None
        if args.speculative is None and (args.draft_model is not None or args.draft_layers is not None):
            raise ConfigError("--draft-model and --draft-layers need --speculative draft")
        if args.speculative is not None:
            speculative = SpeculativeConfig(method=args.speculative, num_tokens=args.num_speculative_tokens,
                                            max_batch_size=args.speculative_max_batch,
                                            draft_model=args.draft_model, draft_layers=args.draft_layers)
        spec = WorkerSpec(
            model=args.model, max_model_len=args.max_model_len, block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory * 1024**2, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_chunk=args.max_prefill_chunk,
            max_prefill_tokens_while_decoding=_decode_prefill_tokens(args),
            prompt_deadline_factor=args.prompt_deadline_factor, enable_prefix_caching=not args.no_prefix_caching, threads=args.threads,
            max_queued_requests=args.max_queued_requests, transfer_timeout=args.transfer_timeout,
            on_transfer_failure=args.on_transfer_failure, kv_transport=args.kv_transport,
            kv_host="127.0.0.1" if args.address is None else None, speculative=speculative,
            device=args.device, gpus_per_worker=args.gpus_per_worker, compile=args.compile,
            quantization=args.quantization, engine_hang_timeout=args.engine_hang_timeout,
            kv_cache_dtype=args.kv_cache_dtype)
        scaling = _scaling_policy(args)
        config = GatewayConfig(
            spec=spec, num_prefill=num_prefill, num_decode=args.decode_workers, router=args.router,
            host=args.host, port=args.port, grpc_port=args.grpc_port, api_key=api_key,
            served_model_name=args.served_model_name, max_in_flight=args.max_in_flight,
            max_migrations=args.max_migrations, tool_call_parser=args.tool_call_parser,
            max_body_bytes=args.max_body_bytes,
            local_prefill_tokens=args.local_prefill_tokens, spill_backlog_tokens=args.spill_backlog_tokens,
            scaling=scaling, shed_on_slo=args.shed_on_slo, otlp_endpoint=args.otlp_endpoint,
            log_format=args.log_format)
    except (ConfigError, ValueError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    most = (scaling.max_prefill, scaling.max_decode, scaling.most_workers) if scaling else \
        (num_prefill, args.decode_workers, num_prefill + args.decode_workers)
    ray = _start_ray(args.address, *most, threads=args.threads)
    try:
        return asyncio.run(_run_gateway(config))
    finally:
        ray.shutdown()


def _scaling_policy(args: argparse.Namespace):
    """The autoscaling policy the flags ask for (None: fixed counts). Raises ConfigError
    on flags that do not go together."""
    from pdserve.cluster.control.autoscaler import ScalingPolicy
    from pdserve.cluster.control.planner import PlannerPolicy
    from pdserve.runtime.config import ConfigError

    targets = {"--ttft-slo": args.ttft_slo, "--tpot-slo": args.tpot_slo}
    if args.autoscale != "slo":
        given = [flag for flag, value in targets.items() if value is not None] + (
            ["--shed-on-slo"] if args.shed_on_slo else [])
        if given:
            raise ConfigError(f"{' and '.join(given)} need the SLO planner: add --autoscale slo")
    if args.autoscale is None:
        return None
    counts = {"min_prefill": 0 if args.colocated else args.min_prefill,
              "max_prefill": 0 if args.colocated else args.max_prefill,
              "min_decode": args.min_decode, "max_decode": args.max_decode, "max_workers": args.max_workers,
              "window_seconds": args.autoscale_window, "up_cooldown": args.autoscale_up_cooldown,
              "down_delay": args.autoscale_down_delay, "down_cooldown": args.autoscale_down_cooldown}
    if args.autoscale == "queue":
        return ScalingPolicy(prefill_tokens_per_worker=args.autoscale_prefill_tokens,
                             decode_waiting_per_worker=args.autoscale_decode_waiting, **counts)
    missing = [flag for flag, value in targets.items() if value is None]
    if missing:
        raise ConfigError(f"--autoscale slo needs its targets: {' and '.join(missing)} SECONDS")
    return PlannerPolicy(ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo,
                         decode_prefill_tokens=_decode_prefill_tokens(args),
                         local_prefill_tokens=args.local_prefill_tokens, **counts)


async def _run_gateway(config) -> int:
    from pdserve.cluster.control.controller import WorkerStartError
    from pdserve.cluster.serve import serve
    from pdserve.runtime.config import ConfigError

    def announce(ready) -> None:
        print(ready, flush=True)

    try:
        await serve(config, announce)
    except (WorkerStartError, ConfigError, ValueError, OSError) as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 1
    print("pdserve: stopped", file=sys.stderr, flush=True)
    return 0


# Prompt tokens per step a disaggregated decode worker computes beside its decodes (its
# local prefills: short prompts, spills): on a 2-core machine a step with 64 prompt tokens
# and 8 decodes takes about 3x a pure decode step, so inter-token latency stays well
# under a second while a 1,500-token prompt spills there.
DECODE_PREFILL_TOKENS = 64


def _decode_prefill_tokens(args) -> int | None:
    if args.decode_prefill_tokens is not None:
        return args.decode_prefill_tokens
    return None if args.colocated else DECODE_PREFILL_TOKENS


def prepare_local_ray(address: str | None) -> None:
    """Before anything imports ray: a local Ray (no `address`) must bind and advertise the
    loopback address only. Ray reads this setting once, when it is first imported; set
    later, it advertises the machine's outside interface even with `_node_ip_address`."""
    if address is None:
        if "ray" in sys.modules:
            logger.warning("ray was imported before pdserve set it up for local use: the local Ray may "
                           "advertise this machine's outside address")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _start_ray(address: str | None, num_prefill: int, num_decode: int, workers: int,
               threads: int | str = "auto"):
    """Join `address`, or start a local Ray bound to 127.0.0.1 with room for the
    workers (and their replacements) under the role resources they ask for: each asks
    for as many CPUs as the cores it is pinned to (`pdserve.runtime.threads`); at most
    `workers` run at once, at most `num_prefill` and `num_decode` of each role."""
    import ray

    from pdserve.runtime.threads import available_cores, cores_per_worker

    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cores = len(available_cores())
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=max(cores, 2 * workers * cores_per_worker(cores, workers, threads)),
                 resources={"prefill": 2 * max(num_prefill, 1), "decode": 2 * num_decode},
                 logging_level=logging.WARNING)
    return ray


def _generate(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.runtime.sampling_params import SAMPLING_FIELDS, SamplingParams
    from pdserve.runtime.threads import CoreLedger, apply_placement, available_cores

    placement = CoreLedger(available_cores(), args.threads, num_workers=1).claim("generate")
    apply_placement(placement)
    print(f"pdserve: {placement}", file=sys.stderr, flush=True)
    try:
        # The sampling flags are named as SamplingParams' fields.
        params = SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FIELDS if hasattr(args, name)})
        print(f"pdserve: loading {args.model} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        llm = LLM(args.model, max_model_len=args.max_model_len, quantization=args.quantization,
                  kv_cache_dtype=args.kv_cache_dtype)
        print(f"pdserve: loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        tokenizer = llm.get_tokenizer()
        if args.chat:
            prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
        outputs = llm.stream(prompt_ids, params)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    first_token_at = None
    output = None
    for text, output in outputs:
        first_token_at = first_token_at or time.perf_counter()
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - started
    num_tokens = len(output.token_ids)
    decode_time = time.perf_counter() - (first_token_at or started)
    rate = (num_tokens - 1) / decode_time if num_tokens > 1 and decode_time > 0 else 0.0
    print(
        f"pdserve: {len(prompt_ids)} prompt tokens, {num_tokens} generated in {elapsed:.2f}s "
        f"(first token {1000 * ((first_token_at or started) - started):.0f} ms, "
        f"decode {rate:.1f} tok/s), finish reason: {output.finish_reason}",
        file=sys.stderr,
    )
    return 0


# `pdserve bench serve`: the serving benchmark of pdserve.cluster.benchmark, an HTTP client of
# any OpenAI-compatible server (bench/serving.py runs the same code from a source checkout).
BENCH_SERVE_EXAMPLES = """examples:
  pdserve bench serve --url http://127.0.0.1:8000 --workload short-chats
  pdserve bench serve --url http://127.0.0.1:8000 --dataset random --request-rate 4 --result-json run.json
  pdserve bench serve --url http://127.0.0.1:8100 --flavor vllm --dataset shared-prefix --plot run.png
  pdserve bench serve --launch="--colocated" --dataset mixed --peer-url http://127.0.0.1:8100
"""


def _add_bench_parser(sub) -> None:
    from pdserve.cluster.benchmark.arguments import DESCRIPTION, HelpFormatter, add_benchmark_flags

    bench = sub.add_parser("bench", help="benchmarks: `pdserve bench serve` measures an OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="TTFT, TPOT, ITL, E2E latency, throughput and goodput over HTTP",
                             description=DESCRIPTION, epilog=BENCH_SERVE_EXAMPLES, formatter_class=HelpFormatter)
    add_benchmark_flags(serve, result_json_default="none, the tables only")
    # The parser itself reports the errors between flags (check_args), with this usage.
    serve.set_defaults(bench_parser=serve)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.cluster.benchmark.arguments import check_args
    from pdserve.cluster.benchmark.command import run_command

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    parser = args.bench_parser
    flags = argparse.Namespace(**{name: value for name, value in vars(args).items() if name != "bench_parser"})
    check_args(parser, flags)
    result_path = Path(flags.result_json) if flags.result_json else None
    return run_command(flags, "pdserve bench serve", result_path)
