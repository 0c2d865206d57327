"""`pdserve serve` as a child process for end-to-end tests, and waiting helpers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil

API_KEY = "test-key"
BLOCK = 4
READY = re.compile(r"OpenAI API at (http://[\d.:]+)/v1, gRPC at ([\d.:]+)")
START_TIMEOUT = 240  # seconds: local Ray plus three worker processes on a 2-core machine


class ServeProcess:
    """`pdserve serve ...` as a child process; knows where it listens."""

    def __init__(self, model: str, *args: str, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        cmd = [sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", "0", "--grpc-port", "0",
               "--api-key", API_KEY, "--block-size", str(BLOCK), "--kv-cache-memory", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.http_url = self.grpc_address = ""
        self.model_name = model
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("pdserve serve did not become ready:\n" + "".join(self.lines[-60:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.http_url, self.grpc_address = match.group(1), match.group(2)
                self._ready.set()
        self._ready.set()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stop_and_check(self) -> None:
        """No engine step or command failed on any worker (a failure there is logged and
        served around, so nothing else would show it); then Ctrl-C: exit code 0 and no
        process of its tree left behind (local Ray included)."""
        if self.proc.poll() is not None:
            return
        errors = {k: v for k, v in self.metrics().items() if k.startswith("pdserve_worker_engine_errors_total") and v}
        assert not errors, f"engine steps or commands failed: {errors}"
        children = self.descendants()
        assert self.stop() == 0, "".join(self.lines[-40:])
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes left after Ctrl-C: {[cmdline(p) for p in alive]}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.http_url}/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def wait_for(predicate, timeout: float = 60, what: str = "condition", state=None):
    """Poll `predicate` until it is truthy; on timeout fail naming `what` and, when given,
    what `state()` says is still in the way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"; still: {state()}" if state else ""))


BUSY_METRICS = ("pdserve_worker_kv_usage", "pdserve_worker_running_requests",
                "pdserve_worker_waiting_for_kv_requests", "pdserve_worker_queue_requests")


def busy_workers(metrics: dict[str, float]) -> dict[str, float]:
    """The per-worker gauges that say a worker holds KV or runs something."""
    return {k: v for k, v in metrics.items() if k.startswith(BUSY_METRICS) and v}


def workers_idle(metrics: dict[str, float]) -> bool:
    """Every worker holds no KV for requests and runs nothing: the pool is at baseline."""
    workers = [k for k in metrics if k.startswith("pdserve_worker_kv_usage")]
    return bool(workers) and not busy_workers(metrics)



def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
