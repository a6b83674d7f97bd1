#!/usr/bin/env python
"""Memory benchmarks for the governor.

1. Budgets: nnresume on the same dataset with several `--max-ram` budgets; the peak memory of the whole process tree,
   measured from outside (sum of PSS: each page once; sum of RSS: shared pages once per process) and as nnresume
   itself counted it, against each budget.
2. Under a memory limit (a child memory cgroup) where nnU-Net with its default -np is OOM-killed: nnU-Net with the
   largest -np that survives, against nnresume given the same limit with --max-ram, and nnresume given no option at
   all (it reads the cgroup's limit itself).

    python scripts/bench_memory.py --workdir /tmp/benchmem --repeats 3 --report BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import shlex
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine, write_section  # noqa: E402
from benchlib import can_make_memory_cgroup, fresh, nnunet_command, run_in_fresh_cgroup, run_measured  # noqa: E402

from nnresume.compare import compare_folders  # noqa: E402
from nnresume.synthetic import DemoSpec, make_dataset  # noqa: E402

GIB, MIB = 2**30, 2**20
BUDGET_SPEC = DemoSpec(dataset_id=951, name="MemBudget", num_cases=4, min_shape=(96, 320, 320),
                       max_shape=(160, 352, 352), seed=77)
OOM_SPEC = DemoSpec(dataset_id=950, name="Oom", num_cases=2, min_shape=(96, 352, 352), max_shape=(192, 352, 352),
                    seed=1201)


def _env(raw: Path, pp: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp), nnUNet_results=str(pp.parent / "r"))
    env.pop("NNRESUME_CRASH_AT", None)
    return env


def budgets(raw: Path, work: Path, values: list[str], repeats: int, np_: int) -> list[dict[str, Any]]:
    spec = BUDGET_SPEC
    rows = []
    for budget in values:
        runs = []
        for i in range(repeats):
            pp = fresh(work / f"budget-{budget}-{i}")
            m = run_measured([sys.executable, "-m", "nnresume", "preprocess", "-d", str(spec.dataset_id), "-np",
                              str(np_), "--max-ram", budget, "--no-pbar"], _env(raw, pp))
            assert m.returncode == 0, m.stderr_tail
            con = sqlite3.connect(pp / spec.folder_name / "nnresume.sqlite")
            own, limit = con.execute("select peak_tree_rss, budget_bytes from runs order by id desc").fetchone()
            stops = con.execute("select count(*) from attempts where outcome='stopped'").fetchone()[0]
            con.close()
            runs.append({"pss": m.peak_pss_sum, "rss": m.peak_rss_sum, "own": own, "budget": limit,
                         "wall": m.wall_s, "stops": stops})
            print(f"  --max-ram {budget}: wall {m.wall_s:.1f} s, peak PSS {m.peak_pss_sum / GIB:.2f} GiB, "
                  f"RSS {m.peak_rss_sum / GIB:.2f} GiB, own {own / GIB:.2f} GiB, {stops} stop(s)")
        rows.append({"budget": budget, "budget_bytes": runs[0]["budget"],
                     **{k: statistics.median(r[k] for r in runs) for k in ("pss", "rss", "own", "wall", "stops")},
                     "max_pss": max(r["pss"] for r in runs), "max_own": max(r["own"] for r in runs)})
    return rows


def under_limit(raw: Path, work: Path, limit_mib: int, repeats: int) -> dict[str, Any]:
    spec = OOM_SPEC
    limit = limit_mib * MIB
    did = str(spec.dataset_id)
    reference = work / "oom-reference"
    plan_cmd = nnunet_command("nnUNetv2_plan_and_preprocess")
    if not (reference / spec.folder_name / "nnUNetPlans.json").exists():
        fresh(reference)
        r = run_measured([plan_cmd, "-d", did, "-npfp", "1", "-np", "1", "--no_pbar"],
                         _env(raw, reference))
        assert r.returncode == 0, r.stderr_tail
    ref = reference / spec.folder_name
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    variants = {
        "nnU-Net, default -np (8 / 4 / 8, -npfp 8)": [plan_cmd, "-d", did, "--no_pbar"],
        "nnU-Net -np 2": [plan_cmd, "-d", did, "-npfp", "2", "-np", "2", "--no_pbar"],
        "nnU-Net -np 1 (-npfp 1)": [plan_cmd, "-d", did, "-npfp", "1", "-np", "1",
                                     "--no_pbar"],
        f"nnresume -np 2 --max-ram {limit_mib}M": [sys.executable, "-m", "nnresume", "preprocess", "-d", did, "-np",
                                                   "2", "--max-ram", f"{limit_mib}M", "--no-pbar"],
        "nnresume -np 2, no --max-ram (reads the cgroup)": [sys.executable, "-m", "nnresume", "preprocess", "-d", did,
                                                            "-np", "2", "--no-pbar"],
    }
    out: dict[str, Any] = {}
    for name, cmd in variants.items():
        runs = []
        for i in range(repeats):
            pp = fresh(work / f"limit-{abs(hash(name))}-{i}")
            r = run_in_fresh_cgroup(limit, cmd, _env(raw, pp), timeout=1800)
            same = None
            if r.returncode == 0:
                same = compare_folders(pp / spec.folder_name, ref, folders, ["nnUNetPlans.json"]) == []
            runs.append({"code": r.returncode, "wall": r.wall_s, "oom": r.oom_kills, "identical": same})
            print(f"  {name}: exit {r.returncode}, {r.wall_s:.1f} s, {r.oom_kills} OOM kill(s), identical {same}")
        ok = [x for x in runs if x["code"] == 0]
        out[name] = {"completed": f"{len(ok)}/{len(runs)}", "oom_kills": sum(x["oom"] for x in runs),
                     "wall": statistics.median(x["wall"] for x in ok) if ok else None,
                     "identical": all(x["identical"] for x in ok) if ok else None}
    return out


def markdown(command: str, rows: list[dict[str, Any]], limit: Optional[dict[str, Any]], limit_mib: int,
             repeats: int) -> str:
    s = BUDGET_SPEC
    lines = [
        "### Memory: peak against the budget", "",
        f"- command: `{command}`",
        f"- dataset: {s.num_cases} synthetic cases, shapes {s.min_shape}–{s.max_shape}; `-np 2`; median of {repeats}",
        f"- machine: {machine()}",
        "- sum of PSS counts each resident page once (what the machine actually holds); sum of RSS counts pages "
        "shared between the forkserver and its workers once per process (as `ps` adds up); 'own count' is the "
        "governor's: RSS of orchestrator and forkserver plus each worker's private memory", "",
        "| --max-ram | budget | peak, sum of PSS (max of runs) | peak, sum of RSS | own count (max of runs) | "
        "cases stopped by the governor | wall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['budget_bytes'] / GIB:.2f} GiB | {r['pss'] / GIB:.2f} "
                     f"({r['max_pss'] / GIB:.2f}) GiB | {r['rss'] / GIB:.2f} GiB | {r['own'] / GIB:.2f} "
                     f"({r['max_own'] / GIB:.2f}) GiB | {r['stops']:.0f} | {r['wall']:.0f} s |")
    if limit:
        lines += ["", f"### Memory: under a {limit_mib} MiB cgroup limit", "",
                  f"- dataset: {OOM_SPEC.num_cases} cases, shapes {OOM_SPEC.min_shape}–{OOM_SPEC.max_shape}; each "
                  f"command in a fresh child memory cgroup limited to {limit_mib} MiB; {repeats} runs each; "
                  "outputs compared with nnU-Net's unconstrained run", "",
                  "| command | completed | OOM kills (all runs) | median wall (completed runs) | outputs identical |",
                  "|---|---:|---:|---:|---|"]
        for name, v in limit.items():
            wall = f"{v['wall']:.1f} s" if v["wall"] is not None else "-"
            same = "-" if v["identical"] is None else "yes" if v["identical"] else "NO"
            lines.append(f"| {name} | {v['completed']} | {v['oom_kills']} | {wall} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--budgets", nargs="+", default=["2.5G", "3G", "4G", "8G"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-mib", type=int, default=2400)
    ap.add_argument("--skip-limit", action="store_true")
    ap.add_argument("--report", type=Path)
    a = ap.parse_args(argv)
    raw = a.workdir / "raw"
    for spec in (BUDGET_SPEC, OOM_SPEC):
        if not (raw / spec.folder_name / "dataset.json").exists():
            make_dataset(spec, raw)
    print("budgets")
    rows = budgets(raw, a.workdir, a.budgets, a.repeats, 2)
    limit = None
    if not a.skip_limit and can_make_memory_cgroup():
        print(f"under a {a.limit_mib} MiB cgroup")
        limit = under_limit(raw, a.workdir, a.limit_mib, a.repeats)
    command = "python scripts/bench_memory.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    text = markdown(command, rows, limit, a.limit_mib, a.repeats)
    print(text)
    if a.report:
        write_section(a.report, "memory", text)
    over = [r for r in rows if r["max_pss"] > r["budget_bytes"]]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
