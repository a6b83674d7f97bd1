#!/usr/bin/env python
"""Side-by-side benchmark: nnUNetv2_plan_and_preprocess against nnresume preprocess, same dataset, same arguments,
separate output folders, measured the same way (scripts/benchlib.py), median of several repeats.

For each repeat: nnU-Net cold; nnresume cold (outputs compared with nnU-Net's); nnresume no-op rerun; and a cold
nnresume run killed with SIGKILL once half its outputs are done, then rerun (how much work was redone). Results are
printed and written into a section of BENCHMARKS.md.

    python scripts/bench.py --name medium --cases 20 --min-shape 64 192 192 --max-shape 96 256 256 \\
        --np 2 --repeats 3 --workdir /tmp/bench --report BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import fresh, interpreter_startup, nnunet_command, run_measured  # noqa: E402

from nnresume.compare import compare_folders  # noqa: E402
from nnresume.synthetic import DemoSpec, case_name, dataset_json, make_dataset  # noqa: E402

# photographs scikit-image (a dependency of nnunetv2) installs with itself: histology, retina, cells, coins, scenes
PHOTOGRAPHS = ("ihc.png", "retina.jpg", "cell.png", "coins.png", "astronaut.png", "coffee.png", "chelsea.png",
               "microaneurysms.png", "moon.png", "camera.png", "brick.png", "gravel.png")


def _env(raw: Path, pp: Path) -> dict[str, str]:
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp),
               nnUNet_results=str(pp.parent / "results"))
    env.pop("NNRESUME_CRASH_AT", None)
    return env


def _q(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def parallel_efficiency(db: Path, run_id: int, wall: float, workers: int) -> float:
    """Sum of per-case times (fingerprint and preprocess attempts; not the dataset-wide reader, aggregation and
    planning steps, during which the other workers wait) over wall time x workers."""
    busy = _q(db, "select coalesce(sum(ended_at - started_at), 0) from attempts where run_id=? and stage in "
                  "('fingerprint', 'preprocess')", (run_id,))[0][0]
    return busy / (wall * workers)


def make_photograph_dataset(spec: DemoSpec, raw: Path) -> Path:
    """2D PNG cases cut from real photographs instead of drawn shapes: tiles of the shapes' (y, x) size range at
    random places, RGB (`colour=3`) or grey, each with a 3-class label from the tile's own intensity tertiles. Real
    texture and noise decode and compress unlike the smooth synthetic images."""
    import skimage
    from PIL import Image

    folder = raw / spec.folder_name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    mode = "RGB" if spec.colour == 3 else "L"
    sources = [numpy.asarray(Image.open(data / name).convert(mode)) for name in PHOTOGRAPHS]
    rng = numpy.random.default_rng(spec.seed)
    for i in range(spec.num_cases):
        src = sources[i % len(sources)]
        h, w = (int(rng.integers(lo, hi + 1)) for lo, hi in zip(spec.min_shape[1:], spec.max_shape[1:]))
        h, w = min(h, src.shape[0]), min(w, src.shape[1])
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        tile = numpy.ascontiguousarray(src[y:y + h, x:x + w])
        grey = tile.mean(axis=-1) if tile.ndim == 3 else tile
        label = numpy.digitize(grey, numpy.quantile(grey, [1 / 3, 2 / 3])).astype(numpy.uint8)
        name = case_name(spec, i)
        Image.fromarray(tile).save(folder / "imagesTr" / f"{name}_0000.png")
        Image.fromarray(label).save(folder / "labelsTr" / f"{name}.png")
    content = dataset_json(spec, folder)
    content["description"] = "Tiles of the photographs scikit-image installs, labelled by intensity tertiles."
    (folder / "dataset.json").write_text(json.dumps(content, indent=4))
    return folder


def kill_at_half(raw: Path, pp: Path, spec: DemoSpec, args: list[str]) -> dict[str, Any]:
    """Cold run killed (SIGKILL, whole group) once half the outputs are done; then the rerun is measured."""
    db = pp / spec.folder_name / "nnresume.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "nnresume", "preprocess", *args], env=_env(raw, pp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    total = None
    while proc.poll() is None:
        try:
            if db.exists():
                rows = _q(db, "select count(*), sum(state='done') from outputs")[0]
                if rows[0] and total is None and _q(db, "select count(*) from configurations")[0][0]:
                    total = rows[0]
                if total and (rows[1] or 0) >= total / 2:
                    break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.monotonic() - t0
    done_before = set(_q(db, "select case_id, data_identifier from outputs where state='done'"))
    rerun = run_measured([sys.executable, "-m", "nnresume", "preprocess", *args], _env(raw, pp))
    assert rerun.returncode == 0, rerun.stderr_tail
    last = _q(db, "select max(id) from runs")[0][0]
    redone = set(_q(db, "select case_id, data_identifier from outputs where run_id=?", (last,)))
    n_total = _q(db, "select count(*) from outputs")[0][0]
    return {"killed_after_s": killed_after, "done_at_kill": len(done_before), "outputs": n_total,
            "rerun_wall_s": rerun.wall_s, "outputs_redone": len(redone),
            "finished_outputs_recomputed": len(redone & done_before)}


def one_repeat(raw: Path, work: Path, spec: DemoSpec, np_: int, extra: list[str], i: int,
               log: Any, kill: bool = True) -> dict[str, Any]:
    nn_args = ["-d", str(spec.dataset_id), "-npfp", str(np_), "-np", str(np_), "--no_pbar", *extra]
    our_args = ["-d", str(spec.dataset_id), "-np", str(np_), "--no-pbar", *extra]
    out: dict[str, Any] = {}
    nn_pp = fresh(work / f"nnunet-{i}")
    m = run_measured([nnunet_command("nnUNetv2_plan_and_preprocess"), *nn_args], _env(raw, nn_pp))
    assert m.returncode == 0, m.stderr_tail
    out["nnunet"] = m
    log(f"  nnU-Net cold: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU")
    our_pp = fresh(work / f"nnresume-{i}")
    m = run_measured([sys.executable, "-m", "nnresume", "preprocess", *our_args], _env(raw, our_pp))
    assert m.returncode == 0, m.stderr_tail
    out["nnresume"] = m
    log(f"  nnresume cold: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU")
    ref = nn_pp / spec.folder_name
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    plans = [p.name for p in ref.glob("*Plans*.json")]
    out["identical"] = compare_folders(our_pp / spec.folder_name, ref, folders, plans) == []
    db = our_pp / spec.folder_name / "nnresume.sqlite"
    out["efficiency"] = parallel_efficiency(db, 1, m.wall_s, np_)
    noop = run_measured([sys.executable, "-m", "nnresume", "preprocess", *our_args], _env(raw, our_pp))
    assert noop.returncode == 0, noop.stderr_tail
    out["noop"] = noop
    log(f"  no-op rerun: {noop.wall_s:.2f} s")
    if not kill:
        return out
    out["kill"] = kill_at_half(raw, fresh(work / f"kill-{i}"), spec, our_args)
    log(f"  kill at 50%: rerun {out['kill']['rerun_wall_s']:.1f} s, "
        f"{out['kill']['finished_outputs_recomputed']} finished outputs recomputed")
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def summarise(runs: list[dict[str, Any]], startup: float) -> dict[str, Any]:
    def med(get: Any) -> float:
        return _median([get(r) for r in runs])

    s = {
        "nnunet_wall": med(lambda r: r["nnunet"].wall_s), "nnresume_wall": med(lambda r: r["nnresume"].wall_s),
        "nnunet_cpu": med(lambda r: r["nnunet"].cpu_s), "nnresume_cpu": med(lambda r: r["nnresume"].cpu_s),
        "nnunet_rss": med(lambda r: r["nnunet"].peak_rss_sum),
        "nnresume_rss": med(lambda r: r["nnresume"].peak_rss_sum),
        "nnunet_pss": med(lambda r: r["nnunet"].peak_pss_sum),
        "nnresume_pss": med(lambda r: r["nnresume"].peak_pss_sum),
        "ratio": _median([r["nnresume"].wall_s / r["nnunet"].wall_s for r in runs]),
        "cpu_ratio": _median([r["nnresume"].cpu_s / r["nnunet"].cpu_s for r in runs]),
        "identical": all(r["identical"] for r in runs),
        "noop": med(lambda r: r["noop"].wall_s), "startup": startup,
        "efficiency": med(lambda r: r["efficiency"]),
        "cpu_source": runs[0]["nnresume"].cpu_source, "repeats": len(runs),
        "per_repeat": [{"nnunet_wall": r["nnunet"].wall_s, "nnresume_wall": r["nnresume"].wall_s,
                        "nnunet_cpu": r["nnunet"].cpu_s, "nnresume_cpu": r["nnresume"].cpu_s,
                        "noop": r["noop"].wall_s, "kill": r.get("kill")} for r in runs],
    }
    if all("kill" in r for r in runs):
        s.update({
            "kill_rerun": med(lambda r: r["kill"]["rerun_wall_s"]),
            "kill_rerun_ratio": _median([r["kill"]["rerun_wall_s"] / r["nnresume"].wall_s for r in runs]),
            "recomputed": max(r["kill"]["finished_outputs_recomputed"] for r in runs),
            "done_at_kill": med(lambda r: r["kill"]["done_at_kill"] / r["kill"]["outputs"]),
        })
    return s


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    from importlib.metadata import version

    import nnunetv2  # noqa: F401

    return (f"{psutil.cpu_count()} CPUs ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, nnunetv2 {version('nnunetv2')}, torch {version('torch')}")


def markdown(name: str, command: str, spec: DemoSpec, extra: list[str], s: dict[str, Any],
             photographs: bool = False) -> str:
    gb = 2**30
    return "\n".join([
        f"### {name}",
        "",
        f"- command: `{command}`",
        f"- dataset: {spec.num_cases} {'tiles of photographs, as' if photographs else 'synthetic'} {spec.ndim}D "
        f"`{spec.file_ending}` cases, shapes "
        f"{spec.min_shape[3 - spec.ndim:]}–{spec.max_shape[3 - spec.ndim:]}, channels {list(spec.channel_names)}, "
        f"{'mixed spacings' if spec.ndim == 3 else 'no spacing'}; arguments for both tools: "
        f"`{' '.join(extra) or '(defaults)'}`",
        f"- machine: {machine()}",
        f"- median of {s['repeats']} repeats; CPU time from {s['cpu_source']}; memory = peak over the run of the "
        "sum over the process tree, sampled (RSS counts pages shared between processes once per process, "
        "PSS counts each page once)",
        "",
        "| | nnU-Net | nnresume | nnresume / nnU-Net |",
        "|---|---:|---:|---:|",
        f"| cold run, wall time | {s['nnunet_wall']:.1f} s | {s['nnresume_wall']:.1f} s | **{s['ratio']:.2f}** |",
        f"| cold run, CPU time | {s['nnunet_cpu']:.1f} s | {s['nnresume_cpu']:.1f} s | {s['cpu_ratio']:.2f} |",
        f"| peak memory, sum of RSS | {s['nnunet_rss'] / gb:.2f} GB | {s['nnresume_rss'] / gb:.2f} GB | "
        f"{s['nnresume_rss'] / s['nnunet_rss']:.2f} |",
        f"| peak memory, sum of PSS | {s['nnunet_pss'] / gb:.2f} GB | {s['nnresume_pss'] / gb:.2f} GB | "
        f"{s['nnresume_pss'] / s['nnunet_pss']:.2f} |",
        f"| outputs identical (arrays, properties, JSON) | | {'yes' if s['identical'] else 'NO'} | |",
        f"| no-op rerun, wall time | | {s['noop']:.2f} s ({s['noop'] - s['startup']:.2f} s beyond the "
        f"{s['startup']:.2f} s interpreter start-up) | |",
        *([f"| rerun after SIGKILL with {s['done_at_kill'] * 100:.0f}% of outputs done | | {s['kill_rerun']:.1f} s "
           f"({s['kill_rerun_ratio']:.2f} of a cold run); finished outputs recomputed: {s['recomputed']} | |"]
          if "kill_rerun" in s else []),
        f"| parallel efficiency (sum of per-case times / (wall x workers)) | | {s['efficiency']:.2f} | |",
        "",
    ])


def write_section(report: Path, name: str, text: str) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    content = report.read_text() if report.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    report.write_text(content)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="bench")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--min-shape", type=int, nargs=3, default=(64, 192, 192))
    ap.add_argument("--max-shape", type=int, nargs=3, default=(96, 256, 256))
    ap.add_argument("--channels", nargs="+", default=["CT"])
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=3, help="2: one 2D image per case (the shapes' y, x)")
    ap.add_argument("--file-ending", default=".nii.gz", help="e.g. .png for natural 2D images")
    ap.add_argument("--colour", type=int, choices=(1, 3, 4), default=1, help="3: RGB in one file per case")
    ap.add_argument("--photographs", action="store_true",
                    help="2D PNG cases cut from the photographs scikit-image installs (with --ndim 2 --file-ending "
                         ".png; --colour 3 for RGB, else grey)")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--args", default="", help="extra arguments for both tools, e.g. '-gpu_memory_target 0.3'")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-kill", action="store_true", help="skip the kill-at-half scenario (cold runs and no-op only)")
    a = ap.parse_args(argv)
    spec = DemoSpec(dataset_id=980, name="Bench", num_cases=a.cases, channels=tuple(a.channels),
                    min_shape=tuple(a.min_shape), max_shape=tuple(a.max_shape), seed=3, ndim=a.ndim,
                    file_ending=a.file_ending, colour=a.colour)
    if a.photographs and (a.ndim != 2 or a.file_ending != ".png" or a.colour not in (1, 3)):
        ap.error("--photographs makes 2D PNG cases: give --ndim 2 --file-ending .png (and --colour 3 for RGB)")
    raw = a.workdir / "raw"
    if not (raw / spec.folder_name / "dataset.json").exists():
        print(f"generating {spec.num_cases} cases")
        (make_photograph_dataset if a.photographs else make_dataset)(spec, raw)
    extra = shlex.split(a.args)
    runs = []
    for i in range(a.repeats):
        print(f"repeat {i + 1}/{a.repeats}")
        runs.append(one_repeat(raw, a.workdir, spec, a.np, extra, i, print, kill=not a.no_kill))
    s = summarise(runs, interpreter_startup())
    args = argv if argv is not None else sys.argv[1:]
    command = "python scripts/bench.py " + " ".join(shlex.quote(x) for x in args)
    text = markdown(a.name, command, spec, extra, s, a.photographs)
    print(text)
    if a.report:
        write_section(a.report, a.name, text)
    if a.json:
        a.json.write_text(json.dumps(s, indent=2, default=str))
    return 0 if s["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
