#!/usr/bin/env python
"""Random kill campaign: SIGKILL `nnresume preprocess` at random moments, then check that nothing was lost or trusted
wrongly.

Each episode preprocesses a synthetic dataset from scratch. At random moments it kills, with SIGKILL, one of: the
orchestrator alone (its workers must follow it), one worker (the run must retry the case), or the whole process group.
After every kill it checks the ledger: `PRAGMA integrity_check`, and that every output and fingerprint the ledger calls
done exists with its recorded size and checksum ("corrupt outputs accepted" counts those that do not). When the kills
of an episode are done it lets the run finish, and compares the result with an uninterrupted run, and checks that no
configuration folder holds a file the ledger does not vouch for.

A case whose worker is killed three times is quarantined, as designed; the campaign reports how often that happened
and finishes such episodes with --retry-quarantined.

    python scripts/kill_campaign.py --kills 200 --workdir /tmp/kills --report RELIABILITY.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import nnunet_command, session_processes  # noqa: E402

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

SPEC = DemoSpec(dataset_id=990, name="Kills", num_cases=8, seed=21)


def _env(raw: Path, pp: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp), PYTHONUNBUFFERED="1")
    env.pop("NNRESUME_CRASH_AT", None)
    return env


def _start(raw: Path, pp: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnresume", "preprocess", *args], env=_env(raw, pp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def workers_of(orchestrator: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(orchestrator).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in children:
        try:
            if "forkserver" in " ".join(c.cmdline()):
                out += c.children()
        except psutil.NoSuchProcess:
            pass
    return out


def _sha(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def check_ledger(dataset: Path) -> dict[str, Any]:
    """Integrity, and whether every output and fingerprint the ledger calls done is really there, intact."""
    ledger = dataset / "nnresume.sqlite"
    if not ledger.exists():
        return {"integrity": "no ledger yet", "corrupt_accepted": 0, "done": 0}
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=60)
    try:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if not {"outputs", "fingerprints"} <= tables:  # killed while the first run created the schema
            return {"integrity": integrity, "corrupt_accepted": 0, "done": 0}
        corrupt = 0
        done = 0
        for ident, files in con.execute("select data_identifier, files from outputs where state='done'"):
            done += 1
            for f in json.loads(files or "[]"):
                p = dataset / ident / f["name"]
                if not p.is_file() or p.stat().st_size != f["size"] or _sha(p) != f["sha256"]:
                    corrupt += 1
        for rel, size, sha in con.execute("select result_file, result_size, result_sha256 from fingerprints "
                                          "where state='done'"):
            p = dataset / ".nnresume" / rel
            if not p.is_file() or p.stat().st_size != size or _sha(p) != sha:
                corrupt += 1
    finally:
        con.close()
    return {"integrity": integrity, "corrupt_accepted": corrupt, "done": done}


def _unvouched(dataset: Path) -> list[str]:
    con = sqlite3.connect(f"file:{dataset / 'nnresume.sqlite'}?mode=ro", uri=True)
    try:
        vouched = {(ident, f["name"]) for ident, files in con.execute(
            "select data_identifier, files from outputs where state='done'") for f in json.loads(files or "[]")}
        idents = {r[0] for r in con.execute("select data_identifier from configurations")}
    finally:
        con.close()
    return [f"{i}/{p.name}" for i in idents if (dataset / i).is_dir() for p in (dataset / i).iterdir()
            if (i, p.name) not in vouched]


def run_campaign(kills: int, workdir: Path, seed: int, workers: int, cases: int, nnunet_reference: bool,
                 log=print) -> dict[str, Any]:
    rng = random.Random(seed)
    spec = DemoSpec(dataset_id=SPEC.dataset_id, name=SPEC.name, num_cases=cases, seed=SPEC.seed)
    raw = workdir / "raw"
    if not (raw / spec.folder_name / "dataset.json").exists():
        make_dataset(spec, raw)
    args = ["-d", str(spec.dataset_id), "-np", str(workers), "--no-pbar"]

    reference = workdir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "nnresume", "preprocess", *args], env=_env(raw, reference),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    duration = time.monotonic() - t0
    folders = sorted(p.name for p in (reference / spec.folder_name).iterdir()
                     if p.is_dir() and p.name != ".nnresume")
    result: dict[str, Any] = {"kills": 0, "kills_by_mode": Counter(), "episodes": 0, "corrupt_accepted": 0,
                              "integrity_failures": 0, "cases_lost": 0, "identical": True, "unvouched_files": 0,
                              "orphaned_processes": 0, "quarantined_then_retried": 0,
                              "reference_seconds": round(duration, 1), "nnunet_identical": None}
    if nnunet_reference:
        nn = workdir / "nnunet"
        shutil.rmtree(nn, ignore_errors=True)
        cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(spec.dataset_id), "-npfp", str(workers),
               "-np", str(workers), "--no_pbar"]
        r = subprocess.run(cmd, env=_env(raw, nn), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        result["nnunet_identical"] = compare_folders(reference / spec.folder_name, nn / spec.folder_name, folders,
                                                     ["nnUNetPlans.json"]) == []

    modes = ["orchestrator", "worker", "group"]
    started = time.monotonic()
    while result["kills"] < kills:
        result["episodes"] += 1
        pp = workdir / "episode"
        shutil.rmtree(pp, ignore_errors=True)
        dataset = pp / spec.folder_name
        finished = False
        first_run = True  # the episode's cold run, as long as it is not restarted
        while not finished:
            proc = _start(raw, pp, args)
            began = time.monotonic()
            while True:
                time.sleep(rng.uniform(0.05, duration * 0.8))
                if proc.poll() is not None or result["kills"] >= kills:
                    if proc.poll() is not None and first_run:
                        # a cold run ended before its first kill: the machine got faster than during the reference
                        # run (its load changes); aim the next kills within what a whole run takes now
                        duration = max(1.0, min(duration, time.monotonic() - began))
                    break
                mode = rng.choice(modes)
                victims = []
                if mode == "worker":  # workers live only while a case runs: wait a little for one
                    wait_until = time.monotonic() + 3
                    while not victims and proc.poll() is None and time.monotonic() < wait_until:
                        victims = workers_of(proc.pid)
                        time.sleep(0.01)
                    if proc.poll() is not None:
                        break
                if mode == "worker" and not victims:
                    mode = "orchestrator"
                if mode == "worker":
                    try:
                        rng.choice(victims).kill()
                    except psutil.NoSuchProcess:
                        continue
                elif mode == "orchestrator":
                    os.kill(proc.pid, signal.SIGKILL)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
                result["kills"] += 1
                result["kills_by_mode"][mode] += 1
                if mode != "worker":
                    break
            first_run = False
            if proc.poll() is None and result["kills"] >= kills:
                proc.wait()  # the last episode runs to its end
            proc.wait()
            deadline = time.monotonic() + 15
            while session_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            leftovers = session_processes(proc.pid)
            if leftovers:
                result["orphaned_processes"] += len(leftovers)
                for p in leftovers:
                    p.kill()
            state = check_ledger(dataset)
            result["corrupt_accepted"] += state["corrupt_accepted"]
            result["integrity_failures"] += state["integrity"] not in ("ok", "no ledger yet")
            if proc.returncode == 3:  # a case killed three times is quarantined, by design
                result["quarantined_then_retried"] += 1
                r = subprocess.run([sys.executable, "-m", "nnresume", "preprocess", *args, "--retry-quarantined"],
                                   env=_env(raw, pp), capture_output=True, text=True)
                finished = r.returncode == 0
            else:
                finished = proc.returncode == 0
            if proc.returncode not in (0, 3, -9):
                log(f"  unexpected exit {proc.returncode}: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        lost = sqlite3.connect(dataset / "nnresume.sqlite").execute(
            "select count(*) from outputs where state != 'done'").fetchone()[0]
        result["cases_lost"] += lost
        same = compare_folders(dataset, reference / spec.folder_name, folders, ["nnUNetPlans.json"]) == []
        result["identical"] &= same
        result["unvouched_files"] += len(_unvouched(dataset))
        log(f"episode {result['episodes']}: {result['kills']} kills so far; identical={same} "
            f"corrupt_accepted={result['corrupt_accepted']} lost={lost} integrity_failures="
            f"{result['integrity_failures']} unvouched={result['unvouched_files']} "
            f"orphaned={result['orphaned_processes']}")
    result["kills_by_mode"] = dict(result["kills_by_mode"])
    result["seconds"] = round(time.monotonic() - started, 1)
    result["ok"] = (result["corrupt_accepted"] == 0 and result["cases_lost"] == 0 and result["identical"]
                    and result["integrity_failures"] == 0 and result["unvouched_files"] == 0
                    and result["orphaned_processes"] == 0)
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    return "\n".join([
        f"- command: `{command}`",
        f"- machine: {platform.node()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        f"- kills: {result['kills']} ({', '.join(f'{k} {v}' for k, v in sorted(result['kills_by_mode'].items()))})"
        f" over {result['episodes']} episode(s), in {result['seconds']} s",
        f"- corrupt outputs accepted: {result['corrupt_accepted']}",
        f"- cases lost: {result['cases_lost']}",
        f"- final outputs identical to an uninterrupted run: {'yes' if result['identical'] else 'NO'}"
        + ("" if result["nnunet_identical"] is None else
           f" (and the uninterrupted run identical to nnU-Net's: {'yes' if result['nnunet_identical'] else 'NO'})"),
        f"- `PRAGMA integrity_check`: {'ok after every kill' if not result['integrity_failures'] else 'FAILED'}",
        f"- files in configuration folders the ledger does not vouch for, after each episode: "
        f"{result['unvouched_files']}",
        f"- processes left behind after a kill: {result['orphaned_processes']}",
        f"- episodes where a case was quarantined after 3 worker kills (by design) and recovered with "
        f"--retry-quarantined: {result['quarantined_then_retried']}",
    ])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-np", "--workers", type=int, default=2)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--nnunet", action="store_true", help="also check the uninterrupted run against nnU-Net's")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--report", type=Path, help="append a markdown summary to this file")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    result = run_campaign(a.kills, a.workdir, a.seed, a.workers, a.cases, a.nnunet)
    command = "python scripts/kill_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if a.report:
        with open(a.report, "a") as f:
            f.write(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
