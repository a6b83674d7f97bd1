"""What the ledger says about a dataset, as a dict (for --json) and as text.

Read-only and safe during a run: SQLite's WAL lets this read while the run writes. Whether the last run is still
alive is decided by its lock: a run marked `running` whose lock is free was killed.
"""
from __future__ import annotations

import statistics
import time
from datetime import datetime
from typing import Any, Optional

from ..config import format_bytes
from ..dataset import GT_IDENTIFIER, DatasetLayout
from ..io.lock import DatasetLock, holder_alive
from ..ledger.models import RunStatus, TaskState
from ..ledger.repository import Ledger

STATES = [s.value for s in TaskState]


def _iso(t: Optional[float]) -> Optional[str]:
    return datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds") if t else None


def run_state(layout: DatasetLayout, status: RunStatus, host: str, pid: int, pid_started_at: Optional[float]) -> str:
    """'running', or 'interrupted' for a run marked running whose process is gone, else the recorded status."""
    if status != RunStatus.running:
        return status.value
    if DatasetLock(layout.lock, layout.name).is_held_elsewhere():
        return "running"
    alive = holder_alive(host, pid, pid_started_at)
    return "running" if alive else "interrupted"


def build_status(layout: DatasetLayout, ledger: Ledger, command: str = "preprocess") -> dict[str, Any]:
    """`command` is "preprocess" for a dataset, "predict" for a prediction folder (which has no fingerprint stage)."""
    configurations = {c.data_identifier: c for c in ledger.configurations()}
    run = ledger.last_run(command)
    running = run is not None and run_state(layout, run.status, run.host, run.pid, run.pid_started_at) == "running"
    rows = ledger.status_rows(list(configurations), run.id if run is not None and running else None)
    out: dict[str, Any] = {"dataset": layout.name, "ledger": str(layout.ledger), "cases": rows.n_cases}

    def counted(counts: dict[str, int]) -> dict[str, int]:
        return {s: counts.get(s, 0) for s in STATES}

    fp_counts, fp_peaks = counted(rows.fingerprint_counts), rows.fingerprint_peaks
    stages: dict[str, Any] = {"fingerprint": {
        "counts": fp_counts, "total": sum(fp_counts.values()), "peak_rss_max": max(fp_peaks, default=None),
        "peak_rss_median": int(statistics.median(fp_peaks)) if fp_peaks else None}}

    for ident, conf in configurations.items():
        counts = counted(rows.output_counts.get(ident, {}))
        peaks = rows.output_peaks.get(ident, [])
        durations = rows.output_durations.get(ident, [])
        stages[ident] = {
            "configuration": conf.configuration, "counts": counts, "total": sum(counts.values()),
            "peak_rss_max": max(peaks, default=None),
            "peak_rss_median": int(statistics.median(peaks)) if peaks else None,
            "largest_cases": ([{"case": n, "peak_rss": p} for p, n in rows.output_largest.get(ident, [])]
                              if ident != GT_IDENTIFIER else []),
            "mean_duration_s": statistics.fmean(durations) if durations else None,
        }
    if command == "predict":
        del stages["fingerprint"]
    else:
        out["plans_changed"] = _plans_changed(layout, list(configurations.values()))
    out["stages"] = stages
    out["failures"] = failures_by_case(rows.fingerprint_failures, rows.output_failures, list(configurations))
    findings = ledger.findings()
    out["problems"] = [{"kind": f.kind, "file": f.path, "message": f.message}
                       for f in findings if f.case is None and f.level == "error"]
    out["warnings"] = [{"case": f.case, "kind": f.kind, "file": f.path, "message": f.message}
                       for f in findings if f.level == "warning"]
    if run is not None:
        state = run_state(layout, run.status, run.host, run.pid, run.pid_started_at)
        out["last_run"] = {
            "id": run.id, "state": state, "started_at": _iso(run.started_at),
            "ended_at": _iso(run.ended_at) if run.ended_at else ("interrupted" if state == "interrupted" else None),
            "end_reason": run.end_reason if state != "interrupted" or run.end_reason else "process gone",
            "arguments": " ".join(run.arguments.get("argv", [])), "host": run.host, "pid": run.pid,
            "workers": run.workers, "budget_bytes": run.budget_bytes, "peak_tree_bytes": run.peak_tree_rss,
            "nnunetv2": run.nnunetv2_version, "log_file": run.log_file,
        }
        if state == "running":
            out["progress"] = _progress(rows, run.started_at, stages, bool(configurations))
    else:
        out["last_run"] = None
    return out


def _plans_changed(layout: DatasetLayout, configurations: list[Any]) -> list[str]:
    """How each plans file in use differs from the copy kept when its outputs were last made (an edit since)."""
    import json

    from ..preprocess.planning import changes_since_last_use

    found: list[str] = []
    for identifier in sorted({c.plans_identifier for c in configurations}):
        path = layout.preprocessed / f"{identifier}.json"
        try:
            plans = json.loads(path.read_text())
            names = [c.configuration for c in configurations
                     if c.plans_identifier == identifier and c.data_identifier != GT_IDENTIFIER]
            found += [f"{path.name}: {line}" for line in changes_since_last_use(layout, path, plans, names)]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            found.append(f"{path.name}: cannot be read ({e})")
    return found


def failures_by_case(fingerprint: list[tuple[Any, ...]], outputs: list[tuple[Any, ...]],
                     idents: list[str]) -> list[dict[str, Any]]:
    """One entry per failing case, in the ledger's case order: the first stage that failed (its reason is the root
    cause: a case whose fingerprint failed is not preprocessed either), and every stage it holds back."""
    entries: dict[int, dict[str, Any]] = {}
    for case_id, name, state, error in fingerprint:
        entries[case_id] = {"case": name, "stage": "fingerprint", "state": state.value, "reason": error,
                            "stages": ["fingerprint"]}
    order = {ident: i for i, ident in enumerate(idents)}
    for case_id, name, ident, state, error in sorted(
            (o for o in outputs if o[2] in order), key=lambda o: (o[0], order[o[2]])):
        entry = entries.setdefault(case_id, {"case": name, "stage": ident, "state": state.value, "reason": error,
                                             "stages": []})
        entry["stages"].append(ident)
    return [entries[k] for k in sorted(entries)]


def _progress(rows: Any, started_at: float, stages: dict[str, Any], planned: bool) -> dict[str, Any]:
    """Cases left in the current stage, and an ETA from this run's own rate of finished cases in it."""
    now = time.time()
    fp = stages["fingerprint"]["counts"] if "fingerprint" in stages else {"pending": 0, "running": 0}
    remaining_fp = fp["pending"] + fp["running"]
    if remaining_fp:
        stage, remaining = "fingerprint", remaining_fp
    else:
        # a case is left until it is done in every data folder; before planning its rows may not exist yet
        stage = "preprocess" if "fingerprint" in stages else "predict"
        remaining = rows.n_cases - (rows.cases_complete if planned else 0)
    done, first = rows.ok_attempts.get(stage, (0, None))
    eta = None
    if done and remaining:
        rate = done / max(1e-6, now - first)
        eta = remaining / rate
    return {"stage": stage, "remaining_cases": remaining,
            "finished_this_run": sum(n for n, _ in rows.ok_attempts.values()),
            "elapsed_s": now - started_at, "eta_s": eta}


def render_status(s: dict[str, Any]) -> str:
    lines = [f"{s['dataset']}  ({s['cases']} cases; ledger {s['ledger']})", ""]
    rows = [("stage", "configuration", "done", "pending", "running", "failed", "quar.", "peak RAM", "median")]
    for ident, st in s["stages"].items():
        c = st["counts"]
        rows.append((ident, st.get("configuration", ""), str(c["done"]), str(c["pending"]), str(c["running"]),
                     str(c["failed"]), str(c["quarantined"]),
                     format_bytes(st.get("peak_rss_max")) if st.get("peak_rss_max") else "-",
                     format_bytes(st.get("peak_rss_median")) if st.get("peak_rss_median") else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    big = sorted(((ident, c) for ident, st in s["stages"].items() for c in st.get("largest_cases", [])),
                 key=lambda x: -x[1]["peak_rss"])
    if big:
        lines.append("")
        lines.append("largest cases: " + ", ".join(f"{c['case']} {format_bytes(c['peak_rss'])} ({ident})"
                                                   for ident, c in big[:6]))
    for p in s.get("problems", []):
        lines.append("")
        lines.append(f"dataset problem: {p['message']}")
    if s.get("plans_changed"):
        lines.append("")
        lines.append("plans changed since the outputs were made (`nnresume preprocess` redoes what they change):")
        lines += [f"  {line}" for line in s["plans_changed"][:20]]
    if s["failures"]:
        lines.append("")
        lines.append(f"failed or quarantined ({len(s['failures'])} case(s)):")
        for f in s["failures"][:30]:
            held = [x for x in f["stages"] if x != f["stage"]]
            also = f" (so not in {', '.join(held)})" if held else ""
            lines.append(f"  {f['case']} [{f['stage']}, {f['state']}]: {f['reason']}{also}")
        if len(s["failures"]) > 30:
            lines.append(f"  ... and {len(s['failures']) - 30} more (see --json)")
    if s.get("warnings"):
        lines.append("")
        lines.append(f"warnings ({len(s['warnings'])}; preprocessed as nnU-Net would, --strict fails them):")
        for w in s["warnings"][:30]:
            lines.append(f"  {w['message']}")
        if len(s["warnings"]) > 30:
            lines.append(f"  ... and {len(s['warnings']) - 30} more (see --json)")
    r = s.get("last_run")
    lines.append("")
    if r is None:
        lines.append("no run recorded yet")
    else:
        end = r["ended_at"] if r["state"] != "running" else "still running"
        lines.append(f"last run #{r['id']}: {r['state']}; started {r['started_at']}, ended {end}")
        if r.get("end_reason"):
            lines.append(f"  reason: {r['end_reason']}")
        lines.append(f"  nnresume {r['arguments']}")
        peak = (f"; peak tree memory {format_bytes(r['peak_tree_bytes'])}" if r["peak_tree_bytes"]
                else "; no case ran" if r["state"] != "running" else "")
        lines.append(f"  host {r['host']} pid {r['pid']}; {r['workers']} workers; budget "
                     f"{format_bytes(r['budget_bytes'])}{peak}")
        if r.get("log_file"):
            lines.append(f"  log: {r['log_file']}")
    p = s.get("progress")
    if p:
        eta = f"{p['eta_s'] / 60:.1f} min" if p["eta_s"] is not None else "unknown yet"
        lines.append(f"  progress: {p['stage']}, {p['remaining_cases']} case(s) left, ETA {eta}")
    return "\n".join(lines)
