"""`nnresume report`: a run as pictures. Memory in use against the budget over time, and each case's duration and peak
memory (with the governor's estimate beside it), as a PNG and as a self-contained HTML page.

Everything comes from the ledger: memory samples (about one a second), attempts (one per try at a case) and outputs.
The HTML page embeds the plotted series as JSON (`<script id="nnresume-data">`), so the numbers behind the picture
can be read back.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..config import format_bytes
from ..dataset import DatasetLayout
from ..errors import NnresumeError
from ..ledger.repository import Ledger

GB = 2**30
MIB = 2**20


@dataclass
class ReportFiles:
    png: Path
    html: Path
    data: dict[str, Any]


def report_data(ledger: Ledger, run_id: Optional[int] = None) -> dict[str, Any]:
    """The run's series. Without `run_id`, the last run that did work: a rerun that found everything done has
    nothing to draw."""
    run = ledger.get_run(run_id) if run_id else (ledger.last_run_with_work("preprocess")
                                                  or ledger.last_run("preprocess"))
    if run is None:
        raise NnresumeError(f"no run {run_id} in the ledger" if run_id else "no run recorded in this ledger yet",
                            "run `nnresume preprocess` first" if not run_id else "see `nnresume status` for runs")
    samples = ledger.memory_samples(run.id)
    t0 = run.started_at
    attempts = ledger.attempts(run.id)
    return {
        "run": {"id": run.id, "started_at": run.started_at, "ended_at": run.ended_at, "status": run.status.value,
                "budget_bytes": run.budget_bytes, "workers": run.workers, "peak_tree_bytes": run.peak_tree_rss,
                "arguments": " ".join(run.arguments.get("argv", []))},
        "memory": {"t": [round(s.t - t0, 2) for s in samples], "tree_bytes": [s.tree_rss for s in samples],
                   "available_bytes": [s.available for s in samples], "budget_bytes": [s.budget for s in samples],
                   "running": [s.running for s in samples]},
        "cases": [{"case": a.case_name, "stage": a.stage, "targets": a.targets, "outcome": a.outcome,
                   "start_s": round(a.started_at - t0, 2), "duration_s": round(a.ended_at - a.started_at, 3),
                   "peak_rss_bytes": a.peak_rss, "private_peak_bytes": a.private_peak,
                   "estimate_bytes": a.estimate_bytes} for a in attempts],
    }


def running_steps(cases: list[dict[str, Any]]) -> tuple[list[float], list[int]]:
    """How many attempts ran at each moment, from their own start and end times (the bars of the second panel),
    as a step function: (times, counts), each count holding from its time to the next."""
    events = sorted([(c["start_s"], 1) for c in cases] + [(c["start_s"] + c["duration_s"], -1) for c in cases])
    times, counts, n = [0.0], [0], 0
    for t, delta in events:
        n += delta
        if times[-1] == t:
            counts[-1] = n
        else:
            times.append(t)
            counts.append(n)
    return times, counts


def _figure(data: dict[str, Any]) -> bytes:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem, cases, run = data["memory"], data["cases"], data["run"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a library's warning is not the user's business on the terminal
        fig, axes = plt.subplots(3, 1, figsize=(11, 12), constrained_layout=True)
        axes[1].sharex(axes[0])
        _memory_panel(axes[0], mem, cases, run)
        _cases_panel(axes[1], cases)
        _peaks_panel(axes[2], cases)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
    return buf.getvalue()


def _legend_outside(ax: Any, handles: Optional[list[Any]] = None) -> None:
    """Legends go beside the axes, where they cover no line."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _memory_panel(ax: Any, mem: dict[str, Any], cases: list[dict[str, Any]], run: dict[str, Any]) -> None:
    handles = []
    if mem["t"]:
        handles += ax.plot(mem["t"], [b / GB for b in mem["tree_bytes"]], label="process tree memory",
                           color="tab:blue")
        handles += ax.plot(mem["t"], [b / GB for b in mem["budget_bytes"]], label="budget", color="tab:red",
                           linestyle="--")
        handles += ax.plot(mem["t"], [b / GB for b in mem["available_bytes"]], label="free on machine / cgroup",
                           color="tab:gray", alpha=0.6)
    if cases:
        ax2 = ax.twinx()
        times, counts = running_steps(cases)
        handles += ax2.step(times, counts, where="post", color="tab:green", alpha=0.6, label="cases running")
        ax2.set_ylabel("cases running")
        ax2.set_ylim(0, max(counts) + 1)
        ax2.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Run {run['id']}: memory against the budget ({format_bytes(run['budget_bytes'])})")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    _legend_outside(ax, handles)


STAGE_COLOURS = {"fingerprint": "tab:purple", "preprocess": "tab:orange"}


def _cases_panel(ax: Any, cases: list[dict[str, Any]]) -> None:
    ok = [c for c in cases if c["outcome"] == "ok"]
    bad = [c for c in cases if c["outcome"] != "ok"]
    steps = [c for c in ok if c["stage"] not in STAGE_COLOURS]  # reader, aggregation, planning: the dataset
    if steps:
        ax.barh([c["stage"] for c in steps], [c["duration_s"] for c in steps], left=[c["start_s"] for c in steps],
                color="tab:gray", label="dataset steps")
    for stage, colour in STAGE_COLOURS.items():
        sel = [c for c in ok if c["stage"] == stage]
        if sel:
            ax.barh([c["case"] + (" fp" if stage == "fingerprint" else "") for c in sel],
                    [c["duration_s"] for c in sel], left=[c["start_s"] for c in sel], color=colour, label=stage)
    if bad:
        ax.barh([c["case"] + " ✗" for c in bad], [c["duration_s"] for c in bad], left=[c["start_s"] for c in bad],
                color="tab:red", label="died, stopped or failed")
    ax.set_title("Each case over time (bar = one attempt)")
    ax.set_xlabel("seconds since the run started")
    ax.tick_params(axis="y", labelsize=6 if len(cases) < 80 else 0)
    if not cases:
        ax.text(0.5, 0.5, "no case ran in this run", transform=ax.transAxes, ha="center", va="center")
    _legend_outside(ax)


def _peaks_panel(ax: Any, cases: list[dict[str, Any]]) -> None:
    """Each case's own memory against its estimate, scaled to the cases (the budget is in the first panel). Both
    leave out the pages a worker shares with the forkserver (nnunetv2's code, counted once as overhead)."""
    drawn = False
    for stage, colour in STAGE_COLOURS.items():
        sel = [c for c in cases if c["stage"] == stage and c.get("private_peak_bytes")]
        if sel:
            drawn = True
            ax.scatter([c["duration_s"] for c in sel], [c["private_peak_bytes"] / MIB for c in sel], color=colour,
                       label=f"{stage}: measured peak", s=18)
        est = [c for c in sel if c["estimate_bytes"]]
        if est:
            ax.scatter([c["duration_s"] for c in est], [c["estimate_bytes"] / MIB for c in est], color=colour,
                       marker="x", alpha=0.6, label=f"{stage}: estimate before start", s=22)
    ax.set_title("Per case: duration and peak memory of its own (beyond what it shares with the forkserver)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    if not drawn:
        ax.text(0.5, 0.5, "no case ran in this run", transform=ax.transAxes, ha="center", va="center")
    _legend_outside(ax)


def _html(layout: DatasetLayout, data: dict[str, Any], png: bytes) -> str:
    run = data["run"]
    started = datetime.fromtimestamp(run["started_at"]).isoformat(sep=" ", timespec="seconds")
    slowest = sorted((c for c in data["cases"] if c["outcome"] == "ok"), key=lambda c: -c["duration_s"])[:15]
    rows = "".join(f"<tr><td>{html.escape(c['case'])}</td><td>{c['stage']}</td>"
                   f"<td>{html.escape(', '.join(c['targets']))}</td><td>{c['duration_s']:.1f}</td>"
                   f"<td>{format_bytes(c['peak_rss_bytes'])}</td><td>{format_bytes(c['estimate_bytes'])}</td></tr>"
                   for c in slowest)
    problems = "".join(f"<li>{html.escape(c['case'])} ({c['stage']}): {c['outcome']}</li>"
                       for c in data["cases"] if c["outcome"] != "ok")
    payload = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nnresume report: {html.escape(layout.name)} run {run['id']}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;font-size:90%}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(layout.name)}: run {run['id']}</h1>
<p>{html.escape(run['status'].replace('_', ' '))}; started {started}; {run['workers']} workers;
budget {format_bytes(run['budget_bytes'])}; peak process tree memory {format_bytes(run['peak_tree_bytes'])}.<br>
<code>nnresume {html.escape(run['arguments'])}</code></p>
<img alt="memory over time and per-case duration and peak memory"
 src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Slowest cases</h2>
<table><tr><th>case</th><th>stage</th><th>configurations</th><th>seconds</th><th>peak RSS</th><th>estimate</th></tr>
{rows}</table>
{"<h2>Attempts that did not finish</h2><ul>" + problems + "</ul>" if problems else ""}
<script type="application/json" id="nnresume-data">{payload}</script>
</body></html>
"""


def write_report(layout: DatasetLayout, ledger: Ledger, out_dir: Path, run_id: Optional[int] = None) -> ReportFiles:
    data = report_data(ledger, run_id)
    png = _figure(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"nnresume-report-{layout.name}-run{data['run']['id']}"
    png_path, html_path = stem.with_suffix(".png"), stem.with_suffix(".html")
    png_path.write_bytes(png)
    html_path.write_text(_html(layout, data, png))
    return ReportFiles(png_path, html_path, data)
