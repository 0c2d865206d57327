"""`pdserve serve` refuses to start, loudly, when it cannot work as configured."""

from __future__ import annotations

import subprocess
import sys


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", "serve", "--port", "0", "--grpc-port", "0", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_forced_kv_transport_that_cannot_work_fails_start_up(tiny_llama_dir):
    # Both workers' KV pools are on the CPU: nccl cannot link them, and there is no
    # silent fallback to another transport.
    done = _serve("--model", str(tiny_llama_dir), "--kv-transport", "nccl", "--kv-cache-memory", "1",
                  "--block-size", "4")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "KV link prefill-0 -> decode-0 does not work" in done.stderr
    assert "nccl needs CUDA" in done.stderr
    assert "OpenAI API at" not in done.stdout


def test_bad_flags_are_refused_before_anything_starts(tiny_llama_dir):
    done = _serve("--model", str(tiny_llama_dir), "--block-size", "3")
    assert done.returncode == 2
    assert "block_size must be a power of two" in done.stderr
