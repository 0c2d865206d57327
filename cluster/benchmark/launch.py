"""The server of a serving benchmark run: `target` yields the base URL of --base-url, or
starts `pdserve serve ARGS` on free ports, waits for /health, and stops it (its whole
process group) when the run ends, keeping its output only when something went wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pdserve.cluster.benchmark.workload import BenchError


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def with_defaults(server_args: list[str], defaults: dict[str, str | None]) -> list[str]:
    """`server_args` plus each default flag they do not set themselves."""
    present = {arg.split("=", 1)[0] for arg in server_args if arg.startswith("--")}
    return server_args + [item for flag, value in defaults.items()
                          if value is not None and flag not in present for item in (flag, value)]


def default_serve_command() -> str:
    script = Path(sys.executable).with_name("pdserve")
    return shlex.join([str(script) if script.exists() else "pdserve", "serve"])


def output_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def launched_server(args: argparse.Namespace, server_args: str,
                    on_start: Callable[[subprocess.Popen], object] | None = None) -> Iterator[str]:
    """Start the server with `server_args` on free ports, wait for /health, yield its base
    URL; stop it (SIGINT, then SIGKILL for its whole process group) when the block ends.
    `on_start` gets the server's process once it is healthy (e.g. to find its workers)."""
    port, grpc_port = free_ports(2)
    extra = with_defaults(shlex.split(server_args),
                          {"--model": args.model, "--host": "127.0.0.1", "--api-key": args.api_key})
    command = shlex.split(args.serve_command) + extra + ["--port", str(port), "--grpc-port", str(grpc_port)]
    base_url = f"http://127.0.0.1:{port}"
    # The output is kept when something went wrong, or when asked (`args.keep_server_logs`);
    # the path is printed either way.
    with tempfile.NamedTemporaryFile("wb", prefix="pdserve-bench-", suffix=".log", delete=False) as log:
        print(f"starting: {shlex.join(command)}\n  (output: {log.name})", file=sys.stderr, flush=True)
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise BenchError(f"cannot run {command[0]!r} ({exc}); point --serve-command at the "
                             "command that starts the server") from exc
        try:
            wait_healthy(process, base_url, args.server_timeout, log.name)
            if on_start is not None:
                on_start(process)
            yield base_url
        finally:
            stop_server(process, args.server_stop_timeout)
    if not getattr(args, "keep_server_logs", False):
        os.unlink(log.name)


def wait_healthy(process: subprocess.Popen, base_url: str, timeout: float, log_path: str) -> None:
    import httpx  # here, not at the top: the command line imports this module for its defaults

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(f"the server exited with code {process.returncode} before {base_url}/health "
                             f"answered; its output ({log_path}) ends with:\n{output_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"the server was not healthy within {timeout:g} s (raise --server-timeout); "
                             f"its output ({log_path}) ends with:\n{output_tail(log_path)}")
        time.sleep(0.5)


def stop_server(process: subprocess.Popen, grace: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"the server ignored SIGINT for {grace:g} s; killing it", file=sys.stderr)
    # The server ran in its own session: whatever is left of its group (helpers it
    # started) belongs to this run and must not load the next one.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def target(args: argparse.Namespace, server_args: str | None) -> Iterator[str]:
    if server_args is None:
        yield args.base_url.rstrip("/")
    else:
        with launched_server(args, server_args) as base_url:
            yield base_url
