"""`pdserve bench serve`, through the real command line: the same requests and result as
bench/serving.py on the same flags and seed, errors a user can act on, and --plot.

The server is test_bench_serving's FakeServer, an OpenAI-compatible streaming app on
127.0.0.1 that records every request body; the model's tokenizer is the real default
one wherever the test compares the two entry points.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_serving import VOCAB, FakeServer, closed_port, serving, words

from pdserve.cluster import cli
from pdserve.cluster.benchmark import command
from pdserve.cluster.benchmark.run import ModelInfo

PDSERVE = Path(sys.executable).with_name("pdserve")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Flags of the compared runs. Concurrency 1: the server sees the requests in sending order.
WORKLOAD = ["--workload", "mixed", "--num-prompts", "6", "--long-len", "120", "--output-len", "3",
            "--max-concurrency", "1", "--request-rate", "40", "--seed", "7", "--warmup-requests", "2"]


@pytest.fixture
def word_counter(monkeypatch):
    """A word-counting stand-in for the model's tokenizer (both entry points read it here)."""
    monkeypatch.setattr(command, "model_info", lambda model: ModelInfo(VOCAB, words))


def shape(value: object) -> object:
    """The JSON structure of `value`: its keys, nesting and types, no values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def tables(out: str) -> str:
    """The printed tables with every number blanked, spaces collapsed (a column's width
    follows its numbers) and the `wrote PATH` lines dropped."""
    lines = [line for line in out.splitlines() if not line.startswith("wrote ")]
    return re.sub(r" +", " ", re.sub(r"\d+(\.\d+)?", "#", "\n".join(lines)))


def test_the_cli_sends_what_the_bench_script_sends_and_reports_the_same(tmp_path, capsys):
    with FakeServer("smollm2-135m-instruct", 0.002, strict=True) as script_server:
        status = serving.main(["--url", script_server.url, *WORKLOAD, "--result-json", str(tmp_path / "script.json")])
    script_out = capsys.readouterr().out
    with FakeServer("smollm2-135m-instruct", 0.002, strict=True) as cli_server:
        cli_status = cli.main(["bench", "serve", "--url", cli_server.url, *WORKLOAD,
                               "--result-json", str(tmp_path / "cli.json")])
    cli_out = capsys.readouterr().out
    assert (status, cli_status) == (0, 0)
    # The same requests, warm-ups first, in the same order, with the same fields.
    assert len(cli_server.bodies) == 2 + 6 and cli_server.bodies == script_server.bodies
    assert all(body["ignore_eos"] and body["stream"] and body["max_tokens"] == 3 for body in cli_server.bodies[2:])

    script, ours = (json.loads((tmp_path / name).read_text()) for name in ("script.json", "cli.json"))
    assert ours["workload"] == script["workload"] and ours["workload"]["requests"] == 6
    assert ours["vocab_size"] == script["vocab_size"] == 49152  # SmolLM2's tokenizer, read by both
    assert shape({**ours, "config": None}) == shape({**script, "config": None})
    # The run's flags, as each entry point resolved them: equal, but for their own extras.
    assert set(ours["config"]) - set(script["config"]) == {"command", "bench_command"}
    assert set(script["config"]) - set(ours["config"]) == {"http_overhead", "overhead_requests"}
    shared = set(ours["config"]) & set(script["config"]) - {"base_url", "result_json"}
    assert {k: ours["config"][k] for k in shared} == {k: script["config"][k] for k in shared}
    (run,), (script_run,) = ours["runs"], script["runs"]
    assert run["label"] == script_run["label"] == "pdserve"
    counts = ("completed", "failed", "input_tokens", "output_tokens", "length_mismatches")
    assert {k: run["metrics"][k] for k in counts} == {k: script_run["metrics"][k] for k in counts}
    assert run["metrics"]["completed"] == 6 and run["metrics"]["output_tokens"] == 18
    planned = ("prompt_len", "max_tokens", "due_s", "output_tokens", "success")
    assert [{k: r[k] for k in planned} for r in run["requests"]] == [
        {k: r[k] for k in planned} for r in script_run["requests"]]
    assert tables(cli_out) == tables(script_out)
    assert "TTFT" in cli_out and "goodput (req/s)" in cli_out


def test_an_openai_flavor_sends_no_extension_fields(tmp_path, word_counter, capsys):
    with FakeServer("gpt-like", 0.001, strict=True) as server:
        status = cli.main(["bench", "serve", "--url", server.url + "/", "--flavor", "openai", "--dataset", "random",
                           "--num-prompts", "3", "--random-input-len", "8", "--output-len", "2",
                           "--result-json", str(tmp_path / "r.json")])
    assert status == 0, capsys.readouterr().err
    assert all(set(body) == {"model", "prompt", "max_tokens", "temperature", "stream", "stream_options"}
               for body in server.bodies)
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert run["label"] == "openai" and run["metrics"]["completed"] == 3


def test_without_result_json_nothing_is_written(tmp_path, word_counter, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FakeServer("m", 0.001) as server:
        status = cli.main(["bench", "serve", "--url", server.url, "--num-prompts", "2", "--random-input-len", "4",
                           "--output-len", "2", "--warmup-requests", "1"])
    assert status == 0 and list(tmp_path.iterdir()) == []
    assert "wrote" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ errors


def test_an_unreachable_url_is_named_with_what_to_do(word_counter, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["bench", "serve", "--url", url, "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pdserve bench serve: error: cannot connect to {url}")
    assert "is the server running there?" in err and "Traceback" not in err


def test_failed_requests_make_the_exit_status_1(word_counter, capsys):
    # pdserve refuses min_tokens: a strict server fails every vllm-flavoured request,
    # the warm-up first, which ends the run.
    with FakeServer("m", 0.001, strict=True) as server:
        status = cli.main(["bench", "serve", "--url", server.url, "--flavor", "vllm", "--num-prompts", "2"])
    assert status == 1
    err = capsys.readouterr().err
    assert "the warm-up request to" in err and "HTTP 400" in err


def test_an_unreachable_peer_gets_advice_that_holds_outside_a_checkout(word_counter, capsys):
    port = closed_port()
    with FakeServer("m", 0.001) as server:
        status = cli.main(["bench", "serve", "--url", server.url, "--peer-url", f"http://127.0.0.1:{port}",
                           "--num-prompts", "2", "--random-input-len", "4", "--output-len", "2"])
    out = capsys.readouterr().out
    assert status == 0  # the server under test was measured; the peer is reported missing
    assert f"is not running at http://127.0.0.1:{port}" in out and f"`vllm serve MODEL --port {port}`" in out
    assert "../shared" not in out and "Reporting pdserve alone" in out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "one of the arguments --url/--base-url --launch --compare is required"),
    (["--url", "127.0.0.1:8000"], "--url must be an http:// or https:// address"),
    (["--url", "http://127.0.0.1:8000", "--request-rate", "0"], "argument --request-rate: must be positive"),
    (["--url", "http://127.0.0.1:8000", "--workload", "long-chats"], "argument --workload: invalid choice"),
    (["--url", "http://127.0.0.1:8000", "--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
    (["--launch", "--flavor", "vllm"], "--flavor describes a --url server"),
    (["--compare", "--colocated --decode-workers 2"], "--compare takes two quoted server argument strings, got 1"),
])
def test_bad_flags_are_usage_errors_that_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "serve", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pdserve bench serve") and message in err


def test_a_model_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["bench", "serve", "--url", "http://127.0.0.1:1", "--model", str(tmp_path / "none")]) == 1
    assert "pdserve bench serve: error: cannot read the tokenizer of --model" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it_before_any_request(word_counter, monkeypatch, capsys,
                                                                           tmp_path):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails
    with FakeServer("m", 0.001) as server:
        status = cli.main(["bench", "serve", "--url", server.url, "--num-prompts", "2",
                           "--plot", str(tmp_path / "p.png")])
    assert status == 1 and server.bodies == []
    assert "--plot needs matplotlib, which is not installed: pip install 'pdserve[bench]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --plot and the installed command


def test_the_installed_command_writes_the_json_and_a_png(tmp_path):
    with FakeServer("smollm2-135m-instruct", 0.002, strict=True) as ours, FakeServer("peer", 0.003) as peer:
        done = subprocess.run(
            [str(PDSERVE), "bench", "serve", "--url", ours.url, "--peer-url", peer.url, "--dataset", "shared-prefix",
             "--num-prompts", "6", "--prefix-len", "16", "--suffix-len", "4", "--num-groups", "2",
             "--output-len", "4", "--request-rate", "50", "--result-json", str(tmp_path / "r.json"),
             "--plot", str(tmp_path / "plots" / "r.png")],
            capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    png = (tmp_path / "plots" / "r.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000  # six drawn panels, not an empty canvas
    result = json.loads((tmp_path / "r.json").read_text())
    assert [run["label"] for run in result["runs"]] == ["pdserve", "peer"]
    assert f"wrote {tmp_path / 'plots' / 'r.png'}" in done.stdout
    assert "HTTP Request" not in done.stderr  # no log line per request
    assert len(ours.bodies) == len(peer.bodies) == 3 + 6


def test_the_parser_imports_neither_the_http_client_nor_matplotlib():
    """`pdserve --help` builds every subcommand's parser; the benchmark's heavy parts load
    only when it runs."""
    probe = ("import sys; from pdserve.cluster.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('httpx', 'matplotlib', 'pdserve.cluster.benchmark.client') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
