"""Start-up progress: a bar on a terminal, a line per quarter in logs, nothing for short work."""

from __future__ import annotations

import io
import logging

import pytest

from pdserve.runtime import progress as progress_module
from pdserve.runtime.loader import _LayerProgress
from pdserve.runtime.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    return now


def test_long_work_logs_each_quarter_once_when_not_on_a_terminal(clock, caplog):
    caplog.set_level(logging.INFO, logger="pdserve.progress")
    progress = Progress("loading m", 8, stream=io.StringIO())
    clock[0] += 3.0  # past the quiet time
    for done in range(1, 9):
        progress.advance_to(done)
        progress.advance_to(done)  # the same point again: nothing more
    progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["2 of 8", "4 of 8", "6 of 8", "8 of 8"]


def test_a_terminal_gets_one_bar_redrawn_in_place(clock):
    terminal = _Terminal()
    progress = Progress("loading m", 4, stream=terminal)
    clock[0] += 2.5
    for done in range(1, 5):
        clock[0] += 1.0
        progress.advance_to(done)
    progress.finish()
    text = terminal.getvalue()
    assert text.count("\r") >= 4 and text.endswith("\n")
    assert "[" + "#" * progress_module.BAR_WIDTH + "] 4/4" in text


def test_short_work_shows_nothing(clock, caplog):
    caplog.set_level(logging.INFO, logger="pdserve.progress")
    terminal = _Terminal()
    progress = Progress("loading m", 4, stream=terminal)
    for done in range(1, 5):
        clock[0] += 0.1
        progress.advance_to(done)
    progress.finish()
    assert terminal.getvalue() == "" and not caplog.records


def test_layers_count_once_passed_in_whatever_order_the_file_lists_them():
    progress = Progress("loading m", 12, stream=io.StringIO())
    seen = _LayerProgress(progress)
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
             "model.layers.10.a", "model.layers.11.a", "model.layers.2.a", "model.norm.weight"]
    reached = []
    for name in names:
        seen(name)
        reached.append(progress.done)
    assert reached == [0, 0, 0, 1, 2, 3, 4, 4]


def test_loading_a_model_reports_its_layers(tiny_llama_dir, monkeypatch, caplog):
    from pdserve.runtime.config import CacheConfig
    from pdserve.runtime.loader import load_model

    monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)  # show even this tiny model's load
    caplog.set_level(logging.INFO, logger="pdserve.progress")
    load_model(str(tiny_llama_dir), cache=CacheConfig(block_size=4, num_blocks=8))
    lines = [r.getMessage() for r in caplog.records if r.name == "pdserve.progress"]
    states = [line.split(": ", 1)[1] for line in lines]  # after "loading <dir>"
    assert [state[:6] for state in states] == ["1 of 3", "2 of 3", "done, "]  # its 3 layers, then done
