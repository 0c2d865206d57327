"""Import direction and namespace: checked on the installed layout, not the source tree.

import-linter reads packages from disk, and in the source tree `pdserve.runtime` lives in
`runtime/`. The test therefore lays the packages out as a wheel would (from the
package-dir mapping in pyproject.toml) and lints that copy.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-dir"]


def test_every_top_level_package_maps_under_pdserve():
    mapping = _package_dirs()
    assert all(name == "pdserve" or name.startswith("pdserve.") for name in mapping)
    for folder in ("runtime", "kernels", "cluster", "prefill_worker", "engine",
                   "kv_transfer", "proto"):
        assert mapping[f"pdserve.{folder}"] == folder


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold(tmp_path):
    for package, folder in _package_dirs().items():
        target = tmp_path.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run(
        [sys.executable, "-c", lint, "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_serve_process_loads_no_engine_code():
    """`pdserve serve` runs the gateway and the controller; the engines load only in the
    worker actors' processes (the controller creates them from this process)."""
    probe = ("import sys; import pdserve.cluster.cli, pdserve.cluster.serve; "
             "print(' '.join(m for m in sys.modules if m.startswith('pdserve.')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = result.stdout.split()
    assert "pdserve.cluster.workers.actors" in loaded  # the probe did import the actors
    engine = ("pdserve.kernels", "pdserve.runtime.models", "pdserve.runtime.model_runner",
              "pdserve.runtime.scheduler", "pdserve.runtime.loader", "pdserve.engine",
              "pdserve.prefill_worker", "pdserve.kv_transfer.pusher")
    assert [m for m in loaded if m.startswith(engine)] == []
