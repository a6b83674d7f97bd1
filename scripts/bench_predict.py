#!/usr/bin/env python
"""Side-by-side benchmark: nnUNetv2_predict against nnresume predict, same inputs, same model, same options.

The model is made here without training or download (benchlib.MAKE_MODEL: an initialised nnUNetTrainer's checkpoint
for the plans nnU-Net makes for a generated dataset; `--net full` keeps the planner's architecture, so inference
costs what it would for a trained model of these plans). For each repeat: nnUNetv2_predict cold, nnresume predict cold
(segmentations compared with nnU-Net's: decoded voxels, spacing, origin, direction), nnresume no-op rerun. Median of
the repeats; ratios are per repeat, then the median.

    python scripts/bench_predict.py --cases 8 --min-shape 32 64 64 --max-shape 40 80 80 --repeats 3 \\
        --workdir /tmp/bench-predict --report /tmp/bench_predict.md

2D (natural images, the 2d configuration): `--ndim 2 --file-ending .png --min-shape 1 256 256 --max-shape 1 320 320`.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import MAKE_MODEL, fresh, nnunet_command, run_measured  # noqa: E402

from nnresume.synthetic import DemoSpec, make_dataset  # noqa: E402


def same_segmentations(ours: Path, reference: Path, ending: str = ".nii.gz") -> list[str]:
    """The cases whose segmentation differs from nnU-Net's (voxels or geometry), or is missing."""
    import numpy as np
    import SimpleITK as sitk

    differ = []
    references = sorted(reference.glob(f"*{ending}"))
    if not references:
        return [f"no {ending} segmentation in {reference}"]
    for ref in references:
        mine = ours / ref.name
        if not mine.is_file():
            differ.append(ref.name)
            continue
        a, b = sitk.ReadImage(str(mine)), sitk.ReadImage(str(ref))
        if not (np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
                and (a.GetSpacing(), a.GetOrigin(), a.GetDirection())
                == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())):
            differ.append(ref.name)
    return differ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--min-shape", type=int, nargs=3, default=(32, 64, 64))
    ap.add_argument("--max-shape", type=int, nargs=3, default=(40, 80, 80))
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=3)
    ap.add_argument("--file-ending", default=".nii.gz")
    ap.add_argument("--configuration", help="default: 3d_fullres, or 2d with --ndim 2")
    ap.add_argument("--net", choices=("full", "small"), default="full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-predict"))
    ap.add_argument("--report", type=Path, help="append the result section to this file")
    ap.add_argument("extra", nargs="*", help="options for both tools after --, e.g. -- -npp 2 -nps 2 --disable_tta")
    a = ap.parse_args()
    a.configuration = a.configuration or ("2d" if a.ndim == 2 else "3d_fullres")

    spec = DemoSpec(dataset_id=970, name="PredBench", num_cases=a.cases, min_shape=tuple(a.min_shape),
                    max_shape=tuple(a.max_shape), ndim=a.ndim, file_ending=a.file_ending, seed=11)
    work = fresh(a.workdir)
    raw, pp, results = work / "raw", work / "preprocessed", work / "results"
    make_dataset(spec, raw)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp), nnUNet_results=str(results))
    env.pop("NNRESUME_CRASH_AT", None)
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(spec.dataset_id), "-c",
                    a.configuration, "--no_pp", "-npfp", "2"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", MAKE_MODEL, str(pp), spec.folder_name, a.configuration, "0", a.net],
                   env=env, check=True, capture_output=True)
    inputs = raw / spec.folder_name / "imagesTr"
    common = ["-i", str(inputs), "-d", str(spec.dataset_id), "-c", a.configuration, "-f", "0", "-device", "cpu",
              *a.extra]

    rows: list[dict[str, Any]] = []
    for i in range(a.repeats):
        print(f"repeat {i + 1}/{a.repeats}", flush=True)
        ref, ours = fresh(work / f"nnunet-{i}"), fresh(work / f"nnresume-{i}")
        nn = run_measured([nnunet_command("nnUNetv2_predict"), *common, "-o", str(ref), "--disable_progress_bar"],
                          env)
        assert nn.returncode == 0, nn.stderr_tail
        print(f"  nnUNetv2_predict: {nn.wall_s:.1f} s wall, {nn.cpu_s:.1f} s CPU", flush=True)
        me = run_measured([sys.executable, "-m", "nnresume", "predict", *common, "-o", str(ours), "--no-pbar"], env)
        assert me.returncode == 0, me.stderr_tail
        print(f"  nnresume predict: {me.wall_s:.1f} s wall, {me.cpu_s:.1f} s CPU", flush=True)
        differ = same_segmentations(ours, ref, a.file_ending)
        noop = run_measured([sys.executable, "-m", "nnresume", "predict", *common, "-o", str(ours), "--no-pbar"], env)
        assert noop.returncode == 0, noop.stderr_tail
        print(f"  no-op rerun: {noop.wall_s:.2f} s; segmentations differing: {len(differ)}", flush=True)
        rows.append({"nn": nn, "me": me, "noop": noop.wall_s, "differ": differ})

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rows)

    vm = psutil.virtual_memory()
    cmd = " ".join(shlex.quote(x) for x in [sys.argv[0], *sys.argv[1:]])
    lines = [
        f"### nnresume predict against nnUNetv2_predict: {a.cases} generated {a.ndim}D cases "
        f"({a.file_ending}), {a.configuration}, "
        f"{a.net} network, CPU",
        "",
        f"- command: `python {cmd}`",
        f"- cases: shapes {tuple(a.min_shape)}-{tuple(a.max_shape)} (z, y, x; z = 1 for 2D), one channel; model: an "
        "initialised "
        f"nnUNetTrainer checkpoint for nnU-Net's plans (fold 0); options for both: `{' '.join(common[2:])}`",
        f"- machine: {psutil.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{vm.total / 2**30:.0f} GiB RAM, Python {platform.python_version()}",
        f"- median of {a.repeats} repeats; CPU time from {rows[0]['nn'].cpu_source}; memory = peak of the sum of RSS "
        "over the process tree, sampled",
        "",
        "| | nnUNetv2_predict | nnresume predict | nnresume / nnU-Net |",
        "|---|---:|---:|---:|",
        f"| wall time | {med(lambda r: r['nn'].wall_s):.1f} s | {med(lambda r: r['me'].wall_s):.1f} s | "
        f"**{med(lambda r: r['me'].wall_s / r['nn'].wall_s):.2f}** |",
        f"| CPU time | {med(lambda r: r['nn'].cpu_s):.1f} s | {med(lambda r: r['me'].cpu_s):.1f} s | "
        f"{med(lambda r: r['me'].cpu_s / r['nn'].cpu_s):.2f} |",
        f"| peak memory, sum of RSS | {med(lambda r: r['nn'].peak_rss_sum) / 1e9:.2f} GB | "
        f"{med(lambda r: r['me'].peak_rss_sum) / 1e9:.2f} GB | "
        f"{med(lambda r: r['me'].peak_rss_sum / r['nn'].peak_rss_sum):.2f} |",
        f"| segmentations identical (voxels, spacing, origin, direction) | | "
        f"{'yes' if not any(r['differ'] for r in rows) else 'NO: ' + ', '.join(rows[0]['differ'])} | |",
        f"| no-op rerun, wall time | | {med(lambda r: r['noop']):.2f} s | |",
        "",
        "Per repeat, wall ratio: " + ", ".join(f"{r['me'].wall_s / r['nn'].wall_s:.2f}" for r in rows) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.report:
        with open(a.report, "a") as f:
            f.write(text + "\n")
    return 0 if not any(r["differ"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
