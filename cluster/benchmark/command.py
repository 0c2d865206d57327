"""A serving benchmark from parsed flags to exit status, for both entry points
(`pdserve bench serve` and bench/serving.py): read the model's tokenizer, run the
benchmark, write the JSON and the --plot, and say what went wrong in terms of flags.

Exit status: 0 when every request to the servers under test succeeded, whatever the peer
did; 1 on any failed request or when the run could not be made (the message says why);
130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pdserve.cluster.benchmark.plot import plot_result, require_matplotlib
from pdserve.cluster.benchmark.report import write_result
from pdserve.cluster.benchmark.run import ModelInfo, model_info, pdserve_failures, run_all
from pdserve.cluster.benchmark.workload import BenchError

Body = Callable[[argparse.Namespace, ModelInfo], dict]  # what to measure: a result dict


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `with` that stops a launched server


def launches_servers(args: argparse.Namespace) -> bool:
    return args.launch is not None or args.compare is not None


def run_command(args: argparse.Namespace, prog: str, result_path: Path | None, body: Body = run_all) -> int:
    """Run `body` on `args` and report it: the tables on stdout, the result as JSON at
    `result_path` (None: no file), the --plot; errors on stderr, prefixed with `prog`."""
    try:
        if args.plot:
            require_matplotlib()  # before the run, not after it
        if launches_servers(args):  # SIGTERM, like Ctrl-C, stops the launched servers
            signal.signal(signal.SIGTERM, interrupt)
        info = model_info(args.model)
        result = body(args, info)
        result = {"config": vars(args), "vocab_size": info.vocab_size, "cpus": os.cpu_count(), **result}
        if result_path is not None:
            print(f"wrote {write_result(result_path, result)}")
        if args.plot:
            print(f"wrote {plot_result(result, Path(args.plot))}")
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if failed := pdserve_failures(result):
        print(f"{prog}: {failed} request(s) to the server under test failed (see above)", file=sys.stderr)
        return 1
    return 0
