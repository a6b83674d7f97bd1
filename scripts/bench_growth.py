#!/usr/bin/env python
"""A finished dataset that grows: what adding ten cases costs nnresume, beside nnU-Net doing the same step.

Steps, each timed (wall) and printed as one JSON line:
1. generate N tiny grey 2D PNG cases (24-40 px, one channel named "MR": z-score normalisation, so that the outputs of
   the old cases stay valid when the dataset's intensity statistics move) and preprocess them cold;
2. `--rounds` times: add ten cases, then `nnresume preprocess` (fingerprint, plan again, preprocess), recording how
   many fingerprints and outputs that run computed;
3. `--rounds` times: add ten cases, then `nnresume preprocess -plans_name nnUNetPlans` (the given plans);
4. nnU-Net on the grown dataset, in a folder of its own: `nnUNetv2_plan_and_preprocess --clean` (it has no way to add
   cases: it fingerprints and preprocesses every case again), and `nnUNetv2_preprocess -plans_name nnUNetPlans`;
   once each (`--skip-nnunet` leaves them out).

    python scripts/bench_growth.py --cases 25000 --workdir /tmp/growth --json /tmp/growth.json

Run it on a quiet machine: nothing else may run while it times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nnresume.synthetic import DemoSpec, make_dataset, write_case, write_dataset_json

DATASET_ID = 987


def _env(raw: Path, preprocessed: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed),
                nnUNet_results=str(preprocessed.parent / "results"))


def timed(cmd: list[str], env: dict[str, str], label: str) -> dict[str, Any]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out: dict[str, Any] = {"step": label, "returncode": r.returncode, "wall_s": round(time.monotonic() - t0, 2)}
    if r.returncode:
        out["stderr_tail"] = r.stderr[-2000:]
    return out


def _work_of_last_run(ledger: Path) -> dict[str, int]:
    con = sqlite3.connect(ledger)
    try:
        (run,) = con.execute("select max(id) from runs").fetchone()
        fingerprints = con.execute("select count(*) from attempts where run_id=? and stage='fingerprint'",
                                   (run,)).fetchone()[0]
        outputs = con.execute("select count(*) from outputs where run_id=?", (run,)).fetchone()[0]
    finally:
        con.close()
    return {"fingerprints_computed": fingerprints, "outputs_written": outputs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=25000)
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-nnunet", action="store_true")
    a = ap.parse_args()
    spec = DemoSpec(dataset_id=DATASET_ID, name="Growth", num_cases=a.cases, min_shape=(1, 24, 24),
                    max_shape=(1, 40, 40), ndim=2, file_ending=".png", channels=("MR",), seed=7)
    raw, pp = a.workdir / "raw", a.workdir / "preprocessed"
    folder = raw / spec.folder_name
    env = _env(raw, pp)
    ledger = pp / spec.folder_name / "nnresume.sqlite"
    results: dict[str, Any] = {"cases": a.cases, "np": a.np, "machine": f"{os.cpu_count()} CPUs"}
    steps: list[dict[str, Any]] = []

    def step(r: dict[str, Any]) -> dict[str, Any]:
        print(json.dumps(r), flush=True)
        steps.append(r)
        return r

    if not (folder / "dataset.json").exists():
        t0 = time.monotonic()
        make_dataset(spec, raw)
        step({"step": "generate", "wall_s": round(time.monotonic() - t0, 1)})
    base = [sys.executable, "-m", "nnresume", "preprocess", "-d", str(DATASET_ID), "-np", str(a.np), "--no-pbar"]
    if not ledger.exists():
        step(timed(base, env, "cold"))
    n = json.loads((folder / "dataset.json").read_text())["numTraining"]

    def add_ten() -> None:
        nonlocal n
        grown = dataclasses.replace(spec, num_cases=n + 10)
        for i in range(n, n + 10):
            write_case(grown, folder, i)
        write_dataset_json(grown, folder)
        n += 10

    for label, cmd in (("plus_ten_replanned", base), ("plus_ten_given_plans", [*base, "-plans_name", "nnUNetPlans"])):
        walls = []
        for _ in range(a.rounds):
            add_ten()
            r = step({**timed(cmd, env, label), **_work_of_last_run(ledger), "cases": n})
            walls.append(r["wall_s"])
        results[f"{label}_median_s"] = statistics.median(walls)

    if not a.skip_nnunet:
        nn_pp = a.workdir / "nnunet-preprocessed"
        shutil.rmtree(nn_pp, ignore_errors=True)
        nn_env = _env(raw, nn_pp)
        nn = ["-d", str(DATASET_ID), "--no_pbar"]
        results["nnunet_plan_and_preprocess_s"] = step(timed(
            ["nnUNetv2_plan_and_preprocess", *nn, "-np", str(a.np), "-npfp", str(a.np), "--clean"], nn_env,
            "nnunet_plan_and_preprocess"))["wall_s"]
        results["nnunet_preprocess_s"] = step(timed(
            ["nnUNetv2_preprocess", *nn, "-plans_name", "nnUNetPlans", "-np", str(a.np)], nn_env,
            "nnunet_preprocess_given_plans"))["wall_s"]
    results["steps"] = steps
    print(json.dumps(results, indent=1))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
