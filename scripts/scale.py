#!/usr/bin/env python
"""Scale test: a generated dataset of many tiny cases (25,000 by default), preprocessed cold, then the commands a
user runs on it, each timed.

Steps (each printed as it ends, and written to --json / a section of --report):
1. generate the dataset (2D grey PNG, 24-40 px, one channel: the smallest cases nnU-Net takes);
2. cold `nnresume preprocess` (wall time, orchestrator peak RSS);
3. no-op rerun; 4. `nnresume status`; 5. `nnresume preprocess --dry-run`;
6. ledger size on disk;
7. ten cases added, rerun: the ten cases' fingerprints are computed (the others' samples for the lower count are
   made from their results, worker/samples.py), the dataset fingerprint and the plans are made again, and the old
   cases' outputs are kept if what the preprocessor reads did not change (the channel here is named "CT": CT
   normalisation reads the dataset's statistics, so they are redone; scripts/bench_growth.py uses a z-scored one).

It takes a long time (the cold run is nnU-Net's own work on every case); it is not part of the test suite.

    python scripts/scale.py --cases 25000 --workdir /tmp/scale --json /tmp/scale.json --report BENCHMARKS.md

`--add-only` repeats step 7 alone on a workdir that has been through a run: ten more cases, one timed rerun.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from nnresume.synthetic import DemoSpec, make_dataset, write_case, write_dataset_json

DATASET_ID = 985


def _env(work: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                nnUNet_results=str(work / "results"))


def timed(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Runs `python -m nnresume ARGS`; wall time and the peak RSS of the nnresume process itself (not its workers)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "nnresume", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    err = proc.stderr.read() if proc.stderr else ""
    out = {"args": args, "returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 2),
           "orchestrator_peak_rss_mib": round(peak / 2**20, 1)}
    if proc.returncode not in (0,):
        out["stderr_tail"] = err[-2000:]
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=25000)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--add-only", action="store_true", help="only add ten cases to the workdir's dataset and rerun")
    a = ap.parse_args()
    env = _env(a.workdir)
    spec = DemoSpec(dataset_id=DATASET_ID, name="Scale", num_cases=a.cases, min_shape=(1, 24, 24),
                    max_shape=(1, 40, 40), ndim=2, file_ending=".png", seed=7)
    raw = a.workdir / "raw"
    folder = raw / spec.folder_name
    results: dict[str, Any] = {"cases": a.cases, "np": a.np, "machine": f"{platform.node()}, {os.cpu_count()} "
                               f"CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"}
    if not (folder / "dataset.json").exists():
        t0 = time.monotonic()
        make_dataset(spec, raw)
        results["generate_s"] = round(time.monotonic() - t0, 1)
    base = ["preprocess", "-d", str(DATASET_ID), "-np", str(a.np), "--no-pbar"]
    if a.add_only:
        n = json.loads((folder / "dataset.json").read_text())["numTraining"]
        grown = dataclasses.replace(spec, num_cases=n + 10)
        for i in range(n, n + 10):
            write_case(grown, folder, i)
        write_dataset_json(grown, folder)
        results["plus_ten"] = timed(base, env)
        return 0
    results["cold"] = timed(base, env)
    results["noop"] = timed(base, env)
    results["status"] = timed(["status", "-d", str(DATASET_ID)], env)
    results["dry_run"] = timed([*base, "--dry-run"], env)
    ledger = a.workdir / "preprocessed" / spec.folder_name / "nnresume.sqlite"
    results["ledger_mib"] = round(sum(p.stat().st_size for p in ledger.parent.glob("nnresume.sqlite*")) / 2**20, 1)
    grown = dataclasses.replace(spec, num_cases=a.cases + 10)
    for i in range(a.cases, a.cases + 10):
        write_case(grown, folder, i)
    write_dataset_json(grown, folder)
    results["plus_ten"] = timed(base, env)
    print(json.dumps(results, indent=1))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.report:
        with a.report.open("a") as f:
            f.write(f"\n## Scale: {a.cases:,} tiny 2D cases\n\n"
                    f"- command: `python scripts/scale.py --cases {a.cases} --np {a.np} --workdir {a.workdir}`\n"
                    f"- machine: {results['machine']}\n\n"
                    "| step | wall (s) | orchestrator peak RSS (MiB) |\n|---|---:|---:|\n")
            for k in ("cold", "noop", "status", "dry_run", "plus_ten"):
                r = results[k]
                f.write(f"| {k} | {r['wall_s']} | {r['orchestrator_peak_rss_mib']} |\n")
            f.write(f"\nLedger on disk: {results['ledger_mib']} MiB.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
