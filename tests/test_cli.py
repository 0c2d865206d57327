"""`pdserve generate` in-process: arguments, output streams, and errors a user can act on."""

import pytest
import torch

from pdserve.cluster.cli import main
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
