"""The gateway process: HTTP (FastAPI on uvicorn) and gRPC (grpc.aio) on one event loop,
both over one `Frontend`, in front of the controller's Ray workers.

`serve(config)` starts the workers, links them, opens both servers, calls `on_ready`
with where it listens, and returns on SIGINT/SIGTERM (at any point, start-up included)
after closing the servers and stopping every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from pdserve.cluster.control.autoscaler import Autoscaler, CountPolicy
from pdserve.cluster.control.cluster_backend import DEFAULT_MAX_MIGRATIONS, ClusterBackend
from pdserve.cluster.control.controller import Controller
from pdserve.cluster.control.planner import PlannerPolicy, SLOPlanner
from pdserve.cluster.control.router import POLICIES, PrefixIndex, Router, local_prefill_slowdown
from pdserve.cluster.control.slo_control import SLOControl
from pdserve.cluster.gateway.frontend import DEFAULT_MAX_REQUEST_BYTES, Frontend, ModelCard
from pdserve.cluster.gateway.grpc_api import start_grpc_server
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.openai.api import create_app
from pdserve.cluster.gateway.tracing import RequestTracer, otlp_tracer_provider
from pdserve.cluster.workers.spec import WorkerSpec
from pdserve.runtime.threads import format_cores
from pdserve.runtime.weights import load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    spec: WorkerSpec
    num_prefill: int = 1
    num_decode: int = 1
    router: str = "prefix_aware"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    api_key: str | None = None
    served_model_name: str | None = None  # default: the --model argument
    max_in_flight: int = 1024  # gateway-wide bound; past it requests get 429
    max_migrations: int = DEFAULT_MAX_MIGRATIONS  # moves per request after its decode worker is lost
    max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # HTTP bodies past it get 413, gRPC messages RESOURCE_EXHAUSTED
    local_prefill_tokens: int = 32  # uncached prompt tokens at most which decode prefills itself
    spill_backlog_tokens: int = 1024  # prefill backlog from which prompts may spill to decode (Router)
    cpus_per_worker: float = 1.0
    tool_call_parser: str | None = None  # the tool-call format; None: the one the chat template writes
    # Autoscale worker counts within its bounds: a ScalingPolicy (queue depth) or a
    # PlannerPolicy (the SLO planner, which also tunes the router).
    scaling: CountPolicy | None = None
    shed_on_slo: bool = False  # with a PlannerPolicy: 429 for requests predicted to miss the TTFT target
    otlp_endpoint: str | None = None  # where request traces go (OTLP/gRPC); None: no tracing
    log_format: str = "plain"  # of the access log lines: plain or json

    def __post_init__(self) -> None:
        if self.shed_on_slo and not isinstance(self.scaling, PlannerPolicy):
            raise ValueError("shedding on the SLO (--shed-on-slo) needs the SLO planner (--autoscale slo)")


class Ready:
    """Where a started gateway listens, and what it started (`details`: the summary's
    lines about workers and links, printed after the first line)."""

    def __init__(self, http_url: str, grpc_address: str, model: str, num_prefill: int, num_decode: int,
                 details: tuple[str, ...] = ()) -> None:
        self.http_url, self.grpc_address, self.model = http_url, grpc_address, model
        self.num_prefill, self.num_decode = num_prefill, num_decode
        self.details = details

    def __str__(self) -> str:
        workers = f"{self.num_prefill} prefill + {self.num_decode} decode" if self.num_prefill else \
            f"{self.num_decode} colocated"
        first = (f"pdserve: serving {self.model} with {workers} workers; OpenAI API at {self.http_url}/v1, "
                 f"gRPC at {self.grpc_address}")
        return "\n".join((first, *(f"  {line}" for line in self.details)))


def startup_summary(controller: Controller) -> tuple[str, ...]:
    """One line per worker (role, cores, KV capacity) and per KV link (its transport)."""
    lines = []
    for handle in sorted(controller.workers.values(), key=lambda h: (h.role != "prefill", h.worker_id)):
        info = handle.info
        capacity = f", KV {info.num_kv_blocks * info.block_size:,} tokens" if info.num_kv_blocks else ""
        lines.append(f"{handle.role} {handle.worker_id}: pid {info.pid}, {info.threads} thread(s) on "
                     f"core(s) {format_cores(info.cores)}{capacity}")
    for (prefill, decode), address in sorted(controller.links.addresses().items()):
        transport = address.split("://", 1)[0] if address else "down"
        lines.append(f"KV link {prefill} -> {decode}: {transport}")
    return tuple(lines)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` owns SIGINT/SIGTERM, so that a
    stop during start-up works too and no signal is re-raised during the shutdown."""

    def capture_signals(self):
        return contextlib.nullcontext()


async def serve(config: GatewayConfig, on_ready: Callable[[Ready], None]) -> None:
    checkpoint = load_checkpoint(config.spec.model)  # metadata and tokenizer only
    max_model_len = config.spec.max_model_len or checkpoint.config.max_position_embeddings
    name = config.served_model_name or config.spec.model
    index = PrefixIndex()
    scaler = None
    if isinstance(config.scaling, PlannerPolicy):
        scaler = SLOPlanner(config.scaling)
    elif config.scaling is not None:
        scaler = Autoscaler(config.scaling)
    controller = Controller(config.spec, config.num_prefill, config.num_decode, index,
                            cpus_per_worker=config.cpus_per_worker, autoscaler=scaler)
    metrics = GatewayMetrics(worker_stats=controller.all_stats, worker_counts=controller.counts,
                             control_status=controller.status)
    controller.on_decision = metrics.scaled  # the metrics read the controller, and count its decisions
    router = Router(POLICIES[config.router](), config.spec.block_size, index,
                    local_prefill_tokens=config.local_prefill_tokens,
                    spill_backlog_tokens=config.spill_backlog_tokens,
                    local_prefill_slowdown=local_prefill_slowdown(config.spec.max_prefill_tokens_while_decoding))
    slo = SLOControl(scaler, router, metrics, shed=config.shed_on_slo) if isinstance(scaler, SLOPlanner) else None
    if slo is not None:
        controller.after_scaling = slo.apply
    tracer = RequestTracer(otlp_tracer_provider(config.otlp_endpoint) if config.otlp_endpoint else None)
    frontend = Frontend(ClusterBackend(controller, router, metrics, max_migrations=config.max_migrations, slo=slo),
                        checkpoint.tokenizer,
                        ModelCard(name, max_model_len, int(time.time())), checkpoint.eos_token_ids, metrics,
                        max_in_flight=config.max_in_flight, tool_call_parser=config.tool_call_parser,
                        tracer=tracer, log_format=config.log_format)
    metrics.track_in_flight(lambda: frontend.num_in_flight)
    http = _HttpServer(uvicorn.Config(create_app(frontend, api_key=config.api_key,
                                                   max_body_bytes=config.max_body_bytes), host=config.host,
                                      port=config.port, log_level="warning", lifespan="off"))
    stop = asyncio.Event()

    def request_stop() -> None:
        stop.set()
        http.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop)
    grpc_server = None
    try:
        if not await _unless_stopped(controller.start(), stop):
            return
        grpc_server, grpc_port = await start_grpc_server(frontend, f"{config.host}:{config.grpc_port}",
                                                         config.api_key, config.max_body_bytes)
        serving = asyncio.create_task(http.serve())
        while not http.started:
            if serving.done():
                serving.result()  # raises why it could not start
                raise RuntimeError(f"the HTTP server could not listen on {config.host}:{config.port}")
            await asyncio.sleep(0.05)
        port = http.servers[0].sockets[0].getsockname()[1]
        on_ready(Ready(f"http://{config.host}:{port}", f"{config.host}:{grpc_port}", name,
                       config.num_prefill, config.num_decode, startup_summary(controller)))
        await serving
    finally:
        log.info("shutting down")
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        await controller.shutdown()
        frontend.close()
        tracer.shutdown()  # exports the spans still pending
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _unless_stopped(work, stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it). True if it completed."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()  # raises if start-up failed
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
