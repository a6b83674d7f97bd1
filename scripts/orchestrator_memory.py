#!/usr/bin/env python
"""Where the orchestrator's memory goes: runs an `nnresume` command in this process and prints its RSS (and the
peak so far, with the phase it was reached in) as each phase of a preprocessing run starts and ends.

RSS is sampled every 50 ms by a thread. With `--trace`, tracemalloc's biggest allocation sites are printed after
each reading of the ledger's cases as well (slow, and the snapshots themselves add to the RSS).

    python scripts/orchestrator_memory.py preprocess -d 985 -np 2 --no-pbar
"""
from __future__ import annotations

import functools
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import psutil

from nnresume.cli import main as nnresume_main
from nnresume.ledger import repository
from nnresume.preprocess import fingerprint, outputs, pipeline

PHASES: list[tuple[Any, str]] = [
    (repository.Ledger, "load_cases"), (repository.Ledger, "end_group"), (fingerprint, "plan_fingerprints"),
    (fingerprint, "run_fingerprints"), (fingerprint, "aggregate"), (outputs, "plan_outputs"),
    (outputs, "run_outputs"), (outputs, "sweep_unvouched"), (pipeline, "_summarize")]


def main(argv: list[str]) -> int:
    trace = bool(argv) and argv[0] == "--trace"
    if trace:
        argv = argv[1:]
        tracemalloc.start()
    proc = psutil.Process()
    peak: dict[str, Any] = {"rss": 0, "phase": "start"}
    phase = ["start"]

    def sample() -> None:
        while True:
            rss = proc.memory_info().rss
            if rss > peak["rss"]:
                peak.update(rss=rss, phase=phase[0])
            time.sleep(0.05)

    def report(label: str) -> None:
        print(f"[memory] {label:28s} RSS {proc.memory_info().rss / 2**20:7.1f} MiB; peak so far "
              f"{peak['rss'] / 2**20:7.1f} MiB (in {peak['phase']})", file=sys.stderr, flush=True)

    def wrapped(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def g(*args: Any, **kwargs: Any) -> Any:
            phase[0] = name
            report(f"> {name}")
            try:
                return f(*args, **kwargs)
            finally:
                report(f"< {name}")
                if trace and name == "load_cases":
                    for stat in tracemalloc.take_snapshot().statistics("lineno")[:12]:
                        print(f"    {stat}", file=sys.stderr)
        return g

    for owner, name in PHASES:
        setattr(owner, name, wrapped(name, getattr(owner, name)))
    threading.Thread(target=sample, daemon=True).start()
    try:
        nnresume_main(argv)  # a click command: exits with the command's exit code
    finally:
        report("end")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
