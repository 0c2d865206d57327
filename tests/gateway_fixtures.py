"""Test helpers for a live gateway: an in-process engine behind a `Frontend`, any ASGI
app served by uvicorn on 127.0.0.1 (a free port) in a background thread, and gRPC servers
on an event loop of their own.

    gateway = LocalGateway.start(tiny_llama_dir)
    with serve_asgi(create_app(gateway.frontend)) as base_url:
        ...  # "http://127.0.0.1:PORT"
    gateway.close()

    servers = GrpcServers()
    address = servers.serve(gateway.frontend)  # "127.0.0.1:PORT"
    servers.close()

The HTTP and gRPC tests build their servers on these.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import openai
import uvicorn

from pdserve.cluster.gateway.backend import Backend, LocalBackend
from pdserve.cluster.gateway.frontend import Frontend, ModelCard
from pdserve.cluster.gateway.grpc_api import start_grpc_server
from pdserve.cluster.gateway.metrics import GatewayMetrics
from pdserve.cluster.gateway.prompt_tokens import PromptTokens
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import EngineCore
from pdserve.runtime.config import CacheConfig
from pdserve.runtime.loader import LoadedModel, load_model
from pdserve.runtime.structured_output import GrammarCompiler

SERVER_START_TIMEOUT = 30.0  # seconds; generous, the machine is shared


@dataclass
class LocalGateway:
    """One model loaded in this process, an `AsyncEngine` stepping it on its own thread,
    and a `Frontend` over it. `frontend_for` builds more frontends over the same engine
    (other limits, a wrapped backend) without loading the model again."""

    loaded: LoadedModel
    engine: AsyncEngine
    frontend: Frontend
    model_name: str
    more_frontends: list[Frontend] = field(default_factory=list)  # from frontend_for; closed with it

    @classmethod
    def start(cls, model_dir: str | Path, *, model_name: str = "tiny", block_size: int = 4,
              num_blocks: int = 256, max_in_flight: int = 1024, max_waiting: int | None = None,
              max_model_len: int | None = None) -> LocalGateway:
        """`max_model_len` below the model's own makes the frontend advertise and enforce a
        shorter context (the engine keeps the model's)."""
        loaded = load_model(str(model_dir), cache=CacheConfig(block_size=block_size, num_blocks=num_blocks))
        grammars = GrammarCompiler(loaded.tokenizer, loaded.runner.config.vocab_size, loaded.info.eos_token_ids)
        engine = AsyncEngine(EngineCore(loaded.runner, loaded.info, grammars=grammars))
        frontend = make_frontend(loaded, LocalBackend(engine, max_waiting=max_waiting), model_name,
                                 max_in_flight=max_in_flight, max_model_len=max_model_len)
        return cls(loaded, engine, frontend, model_name)

    def frontend_for(self, backend: Backend, *, max_in_flight: int = 1024, max_model_len: int | None = None,
                     advertised_context: int | None = None) -> Frontend:
        """A new frontend (with its own metrics) serving this model through `backend`.
        `advertised_context` replaces the model's context as the frontend knows it, even
        with a larger one (a long-context model's, say): the frontend then tokenizes and
        checks prompts against it, and the engine refuses those past its own context."""
        frontend = make_frontend(self.loaded, backend, self.model_name, max_in_flight=max_in_flight,
                                 max_model_len=max_model_len, advertised_context=advertised_context)
        self.more_frontends.append(frontend)
        return frontend

    def kv_blocks_in_use(self) -> int:
        """KV blocks held by live requests: allocated blocks not owned by the prefix cache.
        Read from another thread than the engine's, so only a snapshot."""
        scheduler = self.engine.core.scheduler
        return scheduler.allocator.num_used - scheduler.prefix_cache.num_cached_blocks

    def wait_for_kv_blocks_in_use(self, expected: int, timeout: float = 30.0) -> int:
        """Poll `kv_blocks_in_use` until it equals `expected` or `timeout` seconds pass;
        returns the last value read (the caller asserts on it)."""
        deadline = time.monotonic() + timeout
        while (value := self.kv_blocks_in_use()) != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return value

    def close(self) -> None:
        for frontend in [self.frontend, *self.more_frontends]:
            frontend.close()
        self.engine.shutdown()


def make_frontend(loaded: LoadedModel, backend: Backend, model_name: str, *, max_in_flight: int = 1024,
                  max_model_len: int | None = None, advertised_context: int | None = None) -> Frontend:
    """A frontend with its own metrics serving `loaded` as `model_name` through `backend`."""
    context = min(max_model_len or loaded.info.max_model_len, loaded.info.max_model_len)
    card = ModelCard(model_name, advertised_context or context, int(time.time()))
    return Frontend(backend, loaded.tokenizer, card, loaded.info.eos_token_ids, GatewayMetrics(),
                    max_in_flight=max_in_flight)


class CountingPromptTokens(PromptTokens):
    """A frontend's tokenization (set it as `frontend.prompt_tokens`) that counts the texts
    it encodes; with `hold`, each encode waits until the event is set (60 s at most)."""

    def __init__(self, tokenizer, hold: threading.Event | None = None) -> None:
        super().__init__(tokenizer)
        self.num_encoded = 0
        self.started = threading.Event()  # set by the first encode
        self._hold = hold

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.num_encoded += 1
        self.started.set()
        if self._hold is not None:
            self._hold.wait(timeout=60)
        return super().encode(text, add_special_tokens)


def free_port_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1 (bound, so no one else takes the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_asgi(app, *, timeout_graceful_shutdown: float = 5.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a daemon thread; yields the base URL
    ("http://127.0.0.1:PORT") once the server accepts connections, and stops it on exit."""
    sock = free_port_socket()
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test HTTP server did not start; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_graceful_shutdown + 10)
        sock.close()


class GrpcServers:
    """gRPC gateways (`start_grpc_server`) on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self._thread.start()
        self._servers = []

    def serve(self, frontend: Frontend, api_key: str | None = None, address: str = "127.0.0.1:0",
              **options) -> str:
        """Start a server over `frontend`; returns its address ("127.0.0.1:PORT")."""
        server, port = self.run(start_grpc_server(frontend, address, api_key, **options))
        self._servers.append(server)
        return f"127.0.0.1:{port}"

    def run(self, coro):
        """Run `coro` on the servers' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        for server in self._servers:
            self.run(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class ServedGateway(NamedTuple):
    gateway: LocalGateway
    base_url: str  # "http://127.0.0.1:PORT"
    client: openai.OpenAI  # the official client on base_url/v1, no retries


@contextlib.contextmanager
def served_gateway(model_dir: str | Path, **options) -> Iterator[ServedGateway]:
    """`LocalGateway.start(model_dir, **options)` behind the HTTP API (no API key), with an
    OpenAI client; everything is stopped on exit."""
    from pdserve.cluster.gateway.openai.api import create_app

    gateway = LocalGateway.start(model_dir, **options)
    try:
        with serve_asgi(create_app(gateway.frontend)) as url:
            yield ServedGateway(gateway, url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                                            timeout=120))
    finally:
        gateway.close()
