"""`pdserve generate` in-process: arguments, output streams, and errors a user can act on;
`pdserve serve`'s refusal to serve a non-loopback address without an API key, and its
local Ray on the loopback address."""

import os
import subprocess
import sys

import pytest
import torch

from pdserve.cluster import cli
from pdserve.cluster.cli import build_parser, check_open_bind, is_loopback_host, main
from pdserve.kernels.cpu_extension import cpu_kernels_available
from pdserve.runtime.threads import available_cores, pin_process


@pytest.fixture(autouse=True)
def restore_threads():
    """`generate` pins its process and sizes torch's threads (`--threads auto`); here that
    process is pytest's, so put both back for the tests that follow."""
    cores, threads = available_cores(), torch.get_num_threads()
    yield
    pin_process(cores)
    torch.set_num_threads(threads)


def test_generate_on_a_hf_directory_streams_text(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "Hello world",
               "--max-tokens", "5", "--temperature", "0.8", "--seed", "3"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.endswith("\n") and "pdserve:" not in out
    assert "generated in" in err and "finish reason" in err


@pytest.mark.skipif(not cpu_kernels_available(), reason="int8 weights need the C++ CPU kernels (no compiler here)")
def test_generate_with_int8_weights_and_ignore_eos_makes_exactly_max_tokens(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "Hello world", "--max-tokens", "9",
               "--quantization", "int8", "--ignore-eos"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "9 generated in" in err and "finish reason: length" in err


def test_a_quantization_a_checkpoint_cannot_take_is_a_clear_error(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--quantization", "gguf"])
    assert rc == 2
    assert "no GGUF blocks" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible(tiny_llama_dir, capsys):
    args = ["generate", "--model", str(tiny_llama_dir), "--prompt", "The quick brown fox",
            "--max-tokens", "8", "--temperature", "1.0", "--seed", "42"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_missing_model_path_says_what_is_accepted(capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "/no/such/model does not exist" in err
    assert "smollm2-135m-instruct" in err and ".gguf" in err


def test_prompt_longer_than_context_is_a_clear_error(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", str(tiny_llama_dir), "--max-model-len", "8",
               "--prompt", "The quick brown fox jumps over the lazy dog " * 3])
    assert rc == 2
    assert "but the model's context is 8 tokens" in capsys.readouterr().err


def test_bad_sampling_parameter_names_the_field(tiny_llama_dir, capsys):
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_needs_a_template(tiny_llama_dir, tmp_path, capsys):
    import json
    import shutil
    model = tmp_path / "no_template"
    shutil.copytree(tiny_llama_dir, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_unknown_subcommand_is_rejected():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


# ------------------------------------------------------------------------- `pdserve serve` exposure

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True), ("LocalHost", True),
    ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("fe80::1", False),
    ("example.com", False), ("localhost.example.com", False), ("", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def parse_serve(argv: list[str]):
    return build_parser().parse_args(["serve", *argv])


REFUSAL_NAMES_BOTH_FIXES = ("--api-key", "PDSERVE_API_KEY", "--allow-unauthenticated")


def test_open_bind_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    args = parse_serve(["--host", "0.0.0.0"])
    refusal = check_open_bind(args.host, args.api_key, args.allow_unauthenticated)
    assert refusal is not None and "'0.0.0.0' without an API key" in refusal
    for fix in REFUSAL_NAMES_BOTH_FIXES:
        assert fix in refusal


@pytest.mark.parametrize("argv, env_key", [
    (["--host", "0.0.0.0", "--api-key", "k"], None),  # a key on the command line
    (["--host", "0.0.0.0"], "from-env"),  # a key from the environment (the Helm chart's Secret)
    (["--host", "::1"], None),  # loopback needs nothing
    ([], None),  # the default host is 127.0.0.1
])
def test_a_key_or_a_loopback_bind_needs_nothing(monkeypatch, caplog, argv, env_key):
    if env_key is None:
        monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("PDSERVE_API_KEY", env_key)
    args = parse_serve(argv)
    assert check_open_bind(args.host, args.api_key, args.allow_unauthenticated) is None
    assert "WITHOUT AN API KEY" not in caplog.text


def test_allow_unauthenticated_starts_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    args = parse_serve(["--host", "0.0.0.0", "--allow-unauthenticated"])
    assert check_open_bind(args.host, args.api_key, args.allow_unauthenticated) is None
    [record] = [r for r in caplog.records if "WITHOUT AN API KEY" in r.getMessage()]
    assert record.levelname == "WARNING" and "0.0.0.0" in record.getMessage()


class StartRecorder:
    """Stands in for what `pdserve serve` starts (local Ray, the gateway's servers), so these
    tests never bind an address: records what would have started, with which config."""

    def __init__(self, monkeypatch) -> None:
        self.ray_started = 0
        self.configs = []
        monkeypatch.setattr(cli, "_start_ray", self._start_ray)
        monkeypatch.setattr(cli, "_run_gateway", self._run_gateway)

    def _start_ray(self, *args, **kwargs):
        self.ray_started += 1
        return self

    def shutdown(self) -> None:
        pass

    async def _run_gateway(self, config) -> int:
        self.configs.append(config)
        return 0


def test_serve_on_all_interfaces_without_a_key_exits_before_starting_anything(monkeypatch, capsys):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    started = StartRecorder(monkeypatch)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "pdserve: error: refusing to serve on '0.0.0.0' without an API key" in err
    for fix in REFUSAL_NAMES_BOTH_FIXES:
        assert fix in err
    assert (started.ray_started, started.configs) == (0, [])


def test_an_empty_key_in_the_environment_is_no_key(monkeypatch, capsys):
    monkeypatch.setenv("PDSERVE_API_KEY", "")
    started = StartRecorder(monkeypatch)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert started.ray_started == 0
    # On loopback it starts, open: an empty key is not a key clients could send.
    assert main(["serve"]) == 0
    assert started.configs[-1].api_key is None


def test_serve_passes_the_environment_key_to_the_gateway(monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_API_KEY", "s3cret")
    started = StartRecorder(monkeypatch)
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    [config] = started.configs
    assert (config.host, config.api_key) == ("0.0.0.0", "s3cret")
    assert "WITHOUT AN API KEY" not in caplog.text


def test_serve_allowed_open_warns_and_starts(monkeypatch, caplog):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    started = StartRecorder(monkeypatch)
    assert main(["serve", "--host", "0.0.0.0", "--allow-unauthenticated"]) == 0
    [config] = started.configs
    assert (config.host, config.api_key, started.ray_started) == ("0.0.0.0", None, 1)
    assert "SERVING WITHOUT AN API KEY on 0.0.0.0" in caplog.text


def test_a_local_ray_advertises_the_loopback_address_only():
    """`pdserve serve` sets Ray up before importing anything that imports it (Ray reads
    the setting once): in a process that never had the setting, the node address Ray
    would advertise is 127.0.0.1, not this machine's outside interface."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    script = ("from pdserve.cluster import cli\n"
              "cli.prepare_local_ray(None)\n"
              "import pdserve.cluster.serve\n"  # imports ray, as `_serve` does next
              "from ray._private.services import get_node_ip_address\n"
              "print(get_node_ip_address())\n")
    out = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "127.0.0.1"
