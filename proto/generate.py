"""Regenerate the Python stubs of every .proto in this folder: `python proto/generate.py`.

The sources are staged as `pdserve/proto/<name>.proto` before protoc runs, so the stubs
import each other as `pdserve.proto.<name>_pb2` (the folder installs as `pdserve.proto`)
and register under that unique name in the protobuf descriptor pool. The output is
deterministic for a given grpcio-tools version; tests/test_proto_drift.py regenerates into
a temporary folder and compares byte for byte.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_PATH = Path("pdserve", "proto")  # where the stubs live in the import namespace


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Write `<name>_pb2.py` and `<name>_pb2_grpc.py` for every .proto into `out_dir`;
    return the files written. Raises RuntimeError with protoc's message on failure."""
    sources = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        staged, built = Path(tmp, "src"), Path(tmp, "out")
        (staged / PACKAGE_PATH).mkdir(parents=True)
        built.mkdir()
        for source in sources:
            shutil.copyfile(source, staged / PACKAGE_PATH / source.name)
        # protoc (grpcio-tools, a test/dev dependency) runs in its own process: its bundled
        # protobuf and abseil crash a process that has loaded NIXL's (measured: SIGSEGV).
        args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{staged}", f"-I{_well_known_protos()}",
                f"--python_out={built}", f"--grpc_python_out={built}",
                *(str(PACKAGE_PATH / s.name) for s in sources)]
        if subprocess.run(args, check=False).returncode != 0:
            raise RuntimeError(f"protoc failed on {[s.name for s in sources]}; see its message above")
        written = []
        for stub in sorted((built / PACKAGE_PATH).glob("*.py")):
            target = Path(out_dir, stub.name)
            shutil.copyfile(stub, target)
            written.append(target)
    return written


def _well_known_protos() -> Path:
    spec = importlib.util.find_spec("grpc_tools")  # located, not imported (see generate)
    if spec is None or spec.origin is None:
        raise RuntimeError("grpcio-tools is not installed: pip install 'pdserve[test]'")
    return Path(spec.origin).parent / "_proto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="folder for the stubs (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
