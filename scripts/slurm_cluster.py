#!/usr/bin/env python
"""End to end on SLURM: `nnresume preprocess` on Dask workers that run as SLURM jobs (dask-jobqueue's SLURMCluster),
one worker job cancelled with `scancel` mid-run, then the result checked.

What it does, in order:
1. with `--start-slurm`, writes a one-node SLURM configuration for this machine (its name, CPUs and memory as
   `slurmd -C` reports them) into `<workdir>/slurm`, and starts munged (if munge does not answer yet), slurmctld and
   slurmd with it; `SLURM_CONF` points sbatch, squeue and scancel at it. Without the flag, the SLURM the environment
   already reaches is used.
2. writes a small synthetic dataset (nnresume.synthetic) and, once, nnU-Net's own outputs for it
   (`nnUNetv2_plan_and_preprocess`), the reference the result is compared with;
3. starts a Dask scheduler in this process and `--jobs` SLURM jobs, each running one Dask worker with one thread and
   `--resources MEMORY=<bytes>`, started with `DASK_DISTRIBUTED__WORKER__DAEMON=False` (README, "On a cluster");
4. runs `nnresume preprocess -d ID --scheduler-file F` as a subprocess;
5. once `--kill-after` of the preprocess outputs are done, cancels (`scancel`) the SLURM job of a worker that is
   running a case, and records which cases it was running;
6. lets the run finish; if it stops with an error, runs the same command again (at most `--reruns` times), as the
   README says to;
7. checks: the last run exits 0, `nnresume verify --full` passes, `nnresume status --json` counts every case done
   with no failure, the cases the cancelled job was running are deaths (outcome 'died') in the ledger's attempts, no
   process of the cancelled job is left (`scontrol listpids` before the scancel), and the outputs are identical to
   nnU-Net's. Prints PASS or FAIL with the reasons, writes `<workdir>/summary.json`, and
   exits 1 on failure.

Needs: the `cluster` extra (`pip install -c constraints.txt "nnresume[cluster]"`: distributed, dask-jobqueue), and for
`--start-slurm` root and the Debian packages `slurm-wlm` and `munge`. The SLURM jobs must see `--workdir` at the same
path (on one node they do). Not run in CI: a one-node SLURM needs root and daemons.

    python scripts/slurm_cluster.py --start-slurm --workdir /tmp/nnresume-slurm
    python scripts/slurm_cluster.py --start-slurm --signal KILL --workdir /tmp/nnresume-slurm  # scancel -s KILL --full

The daemons started here are stopped at the end unless `--keep-slurm`; then `SLURM_CONF=<workdir>/slurm/slurm.conf`
reaches them (sinfo, squeue).
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

import psutil

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def command(name: str) -> str:
    """A console script beside this interpreter (a virtualenv that is not activated), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


# ---- a one-node SLURM ------------------------------------------------------------------------------------------

SLURM_CONF = """\
# one-node SLURM for scripts/slurm_cluster.py
ClusterName=nnresume
SlurmctldHost={host}
SlurmUser={user}
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# no cgroups: containers often cannot give slurmd its own cgroup hierarchy
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def this_node() -> dict[str, str]:
    """`slurmd -C`'s view of this machine: NodeName, CPUs, RealMemory, ..."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split("\n")[0].split() if "=" in field)


def munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


def start_munge() -> None:
    if munge_works():
        return
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        os.makedirs(folder, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    if not munge_works():
        raise SystemExit("munged started but `munge -n | unmunge` fails; see /var/log/munge/munged.log")


def slurm_answers() -> bool:
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0


def start_slurm(folder: Path, memory_mb: Optional[int]) -> list[Path]:
    """Writes the configuration and starts the daemons (unless they answer already); returns the pid files of the
    daemons started here."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    os.environ["SLURM_CONF"] = str(conf)
    if conf.exists() and slurm_answers():
        log(f"SLURM already running with {conf}")
        return []
    node = this_node()
    user = "slurm" if _user_exists("slurm") else "root"
    conf.write_text(SLURM_CONF.format(host=node["NodeName"], user=user, dir=folder, cpus=node["CPUs"],
                                      memory=memory_mb or node["RealMemory"]))
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    for path in [folder, *folder.iterdir()]:
        shutil.chown(path, user, user)
    start_munge()
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            log(f"SLURM up: node {node['NodeName']}, {node['CPUs']} CPUs, {memory_mb or node['RealMemory']} MB, "
                f"configuration {conf}")
            return [folder / "slurmd.pid", folder / "slurmctld.pid"]
        time.sleep(1)
    raise SystemExit(f"SLURM's node did not become idle in 60 s (sinfo says {state!r}); see {folder}/*.log")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def stop_daemons(pid_files: list[Path]) -> None:
    for pid_file in pid_files:
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def slurm_version() -> str:
    return subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()


# ---- the dataset, the reference, nnresume -----------------------------------------------------------------------

def env_for(raw: Path, pp: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp),
               nnUNet_results=str(pp.parent / "results"), PYTHONUNBUFFERED="1")
    env.pop("NNRESUME_CRASH_AT", None)
    return env


def reference(raw: Path, work: Path, spec: DemoSpec) -> Path:
    """nnU-Net's own outputs for the dataset, computed once per work folder."""
    pp = work / "nnunet"
    done = pp / ".complete"
    if not done.exists():
        shutil.rmtree(pp, ignore_errors=True)
        pp.mkdir(parents=True)
        log("nnUNetv2_plan_and_preprocess (the reference) ...")
        r = subprocess.run([command("nnUNetv2_plan_and_preprocess"), "-d", str(spec.dataset_id), "-npfp", "2",
                            "-np", "2", "--no_pbar"], env=env_for(raw, pp), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"nnU-Net failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        done.touch()
    return pp / spec.folder_name


def nnresume(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnresume", *args]


def query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def case_of_key(key: str) -> Optional[str]:
    """The case of a Dask key `nnresume-<pp|fp>-<case>-<attempt>-<token>` (dask.py's `_flush`)."""
    parts = str(key).split("-")
    if len(parts) < 5 or parts[0] != "nnresume":
        return None
    return "-".join(parts[2:-2])


def job_processes(job_id: str) -> list[psutil.Process]:
    """The processes SLURM counts as the job's (`scontrol listpids`), to see how long they outlive a scancel."""
    out = subprocess.run(["scontrol", "listpids", str(job_id)], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        try:
            found.append(psutil.Process(int(line.split()[0])))
        except (ValueError, IndexError, psutil.Error):
            pass
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- the run ---------------------------------------------------------------------------------------------------

class Killer:
    """Cancels the SLURM job of one busy worker once `fraction` of the preprocess outputs are done."""

    def __init__(self, cluster: Any, client: Any, db: Path, fraction: float, how: Optional[str]) -> None:
        self.cluster, self.client, self.db, self.fraction, self.how = cluster, client, db, fraction, how
        self.record: Optional[dict[str, Any]] = None
        self.pids: list[psutil.Process] = []
        self.fired_at = 0.0

    def watch(self) -> None:
        """Notes when the last process of the cancelled job is gone."""
        if self.record is None or "job_processes_gone_after_s" in self.record:
            return
        self.pids = [p for p in self.pids if _alive(p)]
        if not self.pids:
            self.record["job_processes_gone_after_s"] = round(time.monotonic() - self.fired_at, 1)

    def due(self) -> bool:
        try:
            total, done = query(self.db, "select count(*), coalesce(sum(state='done'), 0) from outputs "
                                         "where data_identifier like 'nnUNetPlans_%'")[0]
        except sqlite3.OperationalError:  # not created yet
            return False
        return total > 0 and done >= self.fraction * total and done < total

    def fire(self, started: float) -> bool:
        """scancels a job whose worker is running a case; False if no worker is busy right now."""
        processing = self.client.processing()
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        for address, keys in processing.items():
            cases = sorted({c for c in map(case_of_key, keys) if c})
            if not cases:
                continue
            name = info[address]["name"]
            job = self.cluster.workers.get(name)
            job_id = getattr(job, "job_id", None)
            if job_id is None:
                continue
            done = query(self.db, "select count(*) from outputs where state='done' and data_identifier like "
                                  "'nnUNetPlans_%'")[0][0]
            self.pids = job_processes(job_id)
            cmd = ["scancel", *([f"--signal={self.how}", "--full"] if self.how else []), str(job_id)]
            subprocess.run(cmd, check=True)
            self.fired_at = time.monotonic()
            self.record = {"job_id": job_id, "worker": address, "worker_name": name, "cases_running": cases,
                           "keys": list(map(str, keys)), "after_s": round(self.fired_at - started, 1),
                           "preprocess_outputs_done": done, "command": " ".join(cmd),
                           "job_processes": len(self.pids)}
            log(f"{' '.join(cmd)}: job {job_id} (worker {name} at {address}) was running {', '.join(cases)}; "
                f"{done} preprocess outputs done, {self.record['after_s']} s into the run")
            return True
        return False


def run_preprocess(args: list[str], env: dict[str, str], logfile: Path, killer: Optional[Killer]) -> int:
    with open(logfile, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        try:
            while proc.poll() is None:
                if killer is not None and killer.record is None and killer.due():
                    killer.fire(started)
                if killer is not None:
                    killer.watch()
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nnresume-slurm"))
    p.add_argument("--start-slurm", action="store_true", help="write a one-node SLURM configuration and start it")
    p.add_argument("--keep-slurm", action="store_true", help="leave the daemons started here running at the end")
    p.add_argument("--node-memory", type=int, help="RealMemory (MB) for the node (default: what slurmd -C says)")
    p.add_argument("--dataset-id", type=int, default=951)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--min-shape", type=int, nargs=3, default=(40, 96, 96))
    p.add_argument("--max-shape", type=int, nargs=3, default=(56, 128, 128))
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs, one Dask worker (one thread) each")
    p.add_argument("--job-memory", default="3GB", help="each job's --mem and its worker's --memory-limit")
    p.add_argument("--worker-memory", type=int, default=int(2.5e9), help="each worker's MEMORY resource (bytes)")
    p.add_argument("--walltime", default="00:30:00")
    p.add_argument("--kill-after", type=float, default=0.25,
                   help="cancel a worker's job once this fraction of the preprocess outputs are done")
    p.add_argument("--signal", help="scancel --signal=SIG --full (default: a plain scancel, as a user would)")
    p.add_argument("--reruns", type=int, default=2, help="how often the command is run again after an error")
    a = p.parse_args()

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    daemons = start_slurm(work / "slurm", a.node_memory) if a.start_slurm else []
    summary: dict[str, Any] = {"slurm": slurm_version(), "dask_jobqueue": version("dask-jobqueue"),
                               "distributed": version("distributed"), "nnunetv2": version("nnunetv2")}
    failures: list[str] = []
    try:
        spec = DemoSpec(dataset_id=a.dataset_id, name="Slurm", num_cases=a.cases, min_shape=tuple(a.min_shape),
                        max_shape=tuple(a.max_shape), seed=5)
        raw = work / "raw"
        if not (raw / spec.folder_name / "dataset.json").exists():
            make_dataset(spec, raw)
        ref = reference(raw, work, spec)
        pp = work / "nnresume"
        shutil.rmtree(pp, ignore_errors=True)
        pp.mkdir(parents=True)
        db = pp / spec.folder_name / "nnresume.sqlite"
        (work / "jobs").mkdir(exist_ok=True)

        cluster = SLURMCluster(
            cores=1, processes=1, memory=a.job_memory, walltime=a.walltime, log_directory=str(work / "jobs"),
            job_extra_directives=[f"--chdir={work}"],
            worker_extra_args=["--resources", f"MEMORY={a.worker_memory}"],
            job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False"],
            scheduler_options={"dashboard_address": None})
        client = Client(cluster)
        try:
            (work / "job.sh").write_text(cluster.job_script())
            cluster.scale(jobs=a.jobs)
            log(f"waiting for {a.jobs} SLURM job(s) to start their Dask workers ...")
            client.wait_for_workers(a.jobs, timeout=300)
            jobs = {name: job.job_id for name, job in cluster.workers.items()}
            log(f"scheduler {cluster.scheduler_address}; jobs {jobs}")
            scheduler_file = work / "scheduler.json"
            client.write_scheduler_file(str(scheduler_file))
            argv = nnresume("preprocess", "-d", str(spec.dataset_id), "--no-pbar", "--scheduler-file",
                            str(scheduler_file))
            summary.update(command=" ".join(["nnresume", *argv[3:]]), jobs=jobs,
                           dataset=f"{spec.num_cases} cases, shapes {tuple(a.min_shape)}-{tuple(a.max_shape)}")
            env = env_for(raw, pp)
            killer = Killer(cluster, client, db, a.kill_after, a.signal)
            runs = []
            for i in range(1 + a.reruns):
                t0 = time.monotonic()
                rc = run_preprocess(argv, env, work / f"run-{i + 1}.log", killer if i == 0 else None)
                runs.append({"exit": rc, "wall_s": round(time.monotonic() - t0, 1),
                             "log": str(work / f"run-{i + 1}.log")})
                log(f"run {i + 1}: exit {rc} in {runs[-1]['wall_s']} s ({runs[-1]['log']})")
                if rc == 0:
                    break
            summary["runs"] = runs
            summary["kill"] = killer.record
            killer.watch()
            if killer.record is not None and killer.pids:
                killer.record["job_processes_alive_at_end"] = [p.pid for p in killer.pids]
            summary["workers_at_end"] = len(client.scheduler_info(n_workers=-1)["workers"])
        finally:
            client.close()
            cluster.close()

        # ---- the checks
        if runs[-1]["exit"] != 0:
            failures.append(f"the last run exited {runs[-1]['exit']}")
        if killer.record is None:
            failures.append("no worker job was cancelled (no busy worker found at the kill point)")
        elif killer.record.get("job_processes_alive_at_end"):
            failures.append(f"processes of the cancelled job still alive at the end: "
                            f"{killer.record['job_processes_alive_at_end']}")
        verify = subprocess.run(nnresume("verify", "-d", str(spec.dataset_id), "--full", "--no-pbar"),
                                env=env, capture_output=True, text=True)
        summary["verify_exit"] = verify.returncode
        if verify.returncode != 0:
            failures.append(f"nnresume verify --full exited {verify.returncode}: {verify.stdout[-1000:]}")
        status = json.loads(subprocess.run(nnresume("status", "-d", str(spec.dataset_id), "--json"), env=env,
                                           capture_output=True, text=True, check=True).stdout)
        status = status[0] if isinstance(status, list) else status
        stages = {k: (v["counts"]["done"], v["total"]) for k, v in status["stages"].items()}
        summary["status_done"] = stages
        for stage, (done, total) in stages.items():
            if done != total or total != status["cases"]:
                failures.append(f"status: {stage} has {done} of {total} done ({status['cases']} cases)")
        if status["failures"]:
            failures.append(f"status lists failures: {status['failures']}")
        died = query(db, "select run_id, case_name, stage, message from attempts where outcome='died'")
        summary["deaths"] = [{"run": r, "case": c, "stage": s, "message": m} for r, c, s, m in died]
        if killer.record is not None:
            missing = set(killer.record["cases_running"]) - {c for _, c, _, _ in died}
            if missing:
                failures.append(f"cases running on the cancelled job not recorded as deaths: {sorted(missing)}")
        folders = sorted(d.name for d in ref.iterdir() if d.is_dir())
        plans = [f.name for f in ref.glob("*Plans*.json")]
        diffs = compare_folders(pp / spec.folder_name, ref, folders, plans)
        summary["identical_to_nnunet"] = diffs == []
        summary["compared"] = folders + plans
        if diffs:
            failures.append(f"outputs differ from nnU-Net's: {diffs[:10]}")
    finally:
        if daemons and not a.keep_slurm:
            stop_daemons(daemons)

    summary["failures"] = failures
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(("PASS" if not failures else "FAIL") + f": {work / 'summary.json'}")
    for f in failures:
        print(f"  - {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
