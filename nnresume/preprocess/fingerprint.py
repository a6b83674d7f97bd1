"""Stage 1: each case's fingerprint, then the dataset fingerprint aggregated exactly as nnU-Net aggregates it.

A case is analysed again only when its inputs changed, the extractor changed, its result is missing, or the dataset
needs more samples per case than its result holds. That count is 10e7 divided by the number of cases: cases added
lower it, and a result made for more samples gives nnU-Net's samples for fewer exactly (worker/samples.py), so a
dataset that grows costs its new cases' fingerprints only; cases removed raise it, and every case is analysed again.
With given plans (-plans_name) the samples are not used, and any finished result stands. A file whose size or
mtime changed is hashed again; if its content hashes as before (a `touch`), the old result stands. Each case's
result is `analyze_case`'s return value (with what fewer samples are made from), stored exactly but compressed
(blobs.py) and committed like any output.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import format_bytes
from ..dataset import OUTPUT_FORMAT_VERSION, CaseFiles, key_of, num_channels, num_foreground_samples_per_case
from ..errors import DatasetError
from ..execution.memory import fingerprint_units
from ..execution.scheduler import QueueItem, Scheduler
from ..io import atomic
from ..ledger.models import TaskState
from ..ledger.repository import CaseRecord, FindingRecord
from ..tasks import AggregateTask, FingerprintResult, FingerprintTask, InputFileInfo
from .context import RunContext, place_artifact, place_files, stat_matches

log = logging.getLogger(__name__)

FINGERPRINT_JSON = "dataset_fingerprint.json"
# Bytes per foreground sample and channel while a case is analysed: the drawn indices (int64) and values, measured
# at about 8 on nnunetv2 2.8.1, doubled for safety
SAMPLE_BYTES = 16
RESULT_FORMAT = 5  # how a case's result is stored (blobs.py); a change makes every case's fingerprint be redone


@dataclass
class FingerprintWork:
    task_id: str
    case: str
    files: CaseFiles
    reason: str
    attempt_key: str = ""
    known: tuple[InputFileInfo, ...] = ()
    reuse_if_unchanged: bool = False


@dataclass
class FingerprintPlan:
    base: str  # what every case's result depends on besides its files and the sample count
    num_samples: int
    any_count: bool = False  # given plans: a result made for any sample count stands
    work: list[FingerprintWork] = field(default_factory=list)
    skipped_quarantined: list[str] = field(default_factory=list)
    up_to_date: int = 0

    @property
    def key(self) -> str:
        return f"{self.base}:{self.num_samples}"

    def result_key(self, derivable: bool) -> str:
        """The key a finished result is recorded under: the plan's, and whether fewer samples can be made from it."""
        return f"{self.key}:{'down' if derivable else 'exact'}"

    def usable(self, key: Optional[str]) -> bool:
        """Whether a result recorded under `key` serves this dataset as it is."""
        base, _, rest = (key or "").partition(":")
        count, _, kind = rest.partition(":")
        if base != self.base or not count.isdigit():
            return False
        return int(count) == self.num_samples or self.any_count or (kind == "down" and int(count) > self.num_samples)


def made_for(key: str) -> int:
    """The samples per case a result recorded under `key` holds."""
    return int(key.split(":")[1])


def fingerprint_key(extractor: str, dataset_json: dict[str, Any], version: str) -> str:
    return key_of({"format": OUTPUT_FORMAT_VERSION, "result_format": RESULT_FORMAT, "extractor": extractor,
                   "nnunetv2": version, "file_ending": dataset_json["file_ending"],
                   "reader": dataset_json.get("overwrite_image_reader_writer")})


def _stat_changed(record: CaseRecord, files: CaseFiles) -> Optional[str]:
    known = {(f.role, f.channel): f for f in record.files}
    current = files.all_files()
    if len(known) != len(current):
        return "its files changed (channels added or removed)"
    for role, channel, path in current:
        k = known.get((role, channel))
        if k is None or k.path != path:
            return f"{role} file changed: {os.path.basename(path)}"
        try:
            st = os.stat(path)
        except OSError:
            return f"{role} file missing: {os.path.basename(path)}"
        if st.st_size != k.size or st.st_mtime_ns != k.mtime_ns:
            return f"{role} file size or time changed: {os.path.basename(path)}"
    return None


def attempt_key(key: str, files: CaseFiles) -> str:
    """What an attempt at a case's fingerprint is made from: the extractor key and the files' sizes and mtimes."""
    stats: list[tuple[str, int, str, Optional[int], Optional[int]]] = []
    for role, channel, path in files.all_files():
        try:
            st = os.stat(path)
            stats.append((role, channel, path, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((role, channel, path, None, None))
    return key_of({"key": key, "files": stats})


def plan_fingerprints(ctx: RunContext, cases: dict[str, CaseFiles], records: dict[str, CaseRecord],
                      dataset_json: dict[str, Any]) -> FingerprintPlan:
    s = ctx.settings
    n = num_foreground_samples_per_case(len(cases))
    plan = FingerprintPlan(fingerprint_key(s.fingerprint_extractor, dataset_json, ctx.nnunetv2_version), n,
                           any_count=s.plans_name is not None)
    key = plan.base  # what an attempt is made from (quarantine): not the sample count
    # strings, not Paths or os.path.join: this loop runs once per case (25,000 and more)
    work_prefix = os.path.join(str(ctx.layout.work), "")
    for name, files in cases.items():
        rec = records.get(name)
        fp = rec.fingerprint if rec else None

        def work(reason: str, known: tuple = (), reuse: bool = False, name: str = name,
                 files: CaseFiles = files) -> None:
            plan.work.append(FingerprintWork(f"fp-{name}", name, files, reason, attempt_key(key, files), known,
                                             reuse))

        if rec is None or fp is None:
            work("new case")
            continue
        if fp.state == TaskState.quarantined:
            if fp.attempt_key == attempt_key(key, files) and not s.retry_quarantined:
                plan.skipped_quarantined.append(name)
            else:
                work("quarantined before; its inputs or the extractor changed" if not s.retry_quarantined
                     else "quarantined before; --retry-quarantined")
            continue
        known = tuple(rec.files)
        changed = _stat_changed(rec, files) if rec.files else "no recorded inputs"
        result_ok = (fp.state == TaskState.done and plan.usable(fp.key) and fp.result_file is not None
                     and stat_matches(work_prefix + fp.result_file, fp.result_size))
        if changed:
            work(changed, known, reuse=result_ok)
        elif fp.state == TaskState.pending and not fp.attempts:
            work("not started yet", known)
        elif fp.state in (TaskState.pending, TaskState.running):
            work("interrupted", known)
        elif fp.state != TaskState.done:
            work(f"{fp.state.value} before", known)
        elif not plan.usable(fp.key):
            work("fingerprint extractor changed, or fewer cases than its samples were drawn for", known)
        elif not result_ok:
            work("result file missing or altered", known)
        else:
            plan.up_to_date += 1
    return plan


class FingerprintHandler:
    stage = "fingerprint"

    def __init__(self, ctx: RunContext, plan: FingerprintPlan, reader_writer: str, dataset_json: dict[str, Any]
                 ) -> None:
        self.ctx, self.plan, self.reader, self.dataset_json = ctx, plan, reader_writer, dataset_json
    def build(self, item: QueueItem, attempt: int) -> FingerprintTask:
        w: FingerprintWork = item.spec
        return FingerprintTask(
            task_id=w.task_id, case=w.case, files=tuple(w.files.all_files()),
            extractor=self.ctx.settings.fingerprint_extractor, reader_writer=self.reader,
            num_samples=self.plan.num_samples, staging=str(self.ctx.staging / f"{w.task_id}-{attempt}"),
            dataset_json=self.dataset_json, known=w.known, reuse_if_unchanged=w.reuse_if_unchanged,
            read_cache=self.ctx.read_cache.allot(w.case, item.units.get("fingerprint", 0)) if self.ctx.read_cache
            else "")

    def started(self, item: QueueItem) -> None:
        self.ctx.ledger.fingerprint_started(item.case, self.ctx.run_id, item.estimate, item.spec.attempt_key)

    def received(self, item: QueueItem, msg: Any) -> None:
        assert isinstance(msg, FingerprintResult)
        files = list(msg.files)
        if msg.unchanged:
            log.debug("case %s: inputs touched but unchanged; fingerprint kept", msg.case)
            self.ctx.ledger.fingerprint_unchanged(msg.case, files)
            return
        assert msg.result is not None
        group = self.ctx.group
        if group and group.later(msg.case, self.ctx.layout.fingerprints, [msg.result.name],
                                 lambda: self.received(item, msg)):
            return
        place_files([msg.result], self.ctx.layout.fingerprints, msg.case, group)
        self.ctx.ledger.fingerprint_done(
            msg.case, self.ctx.run_id, self.plan.result_key(msg.derivable), msg.input_digest, files,
            os.path.relpath(self.ctx.layout.fingerprints / msg.result.name, self.ctx.layout.work),
            msg.result.size, msg.result.sha256, msg.shape_after_crop or [], msg.spacing or [], msg.duration_s,
            msg.peak_rss, msg.header, [FindingRecord(msg.case, "warning", w.kind, w.path, w.message)
                                       for w in msg.warnings])
        for w in msg.warnings:
            log.warning("warning: %s", w.message)

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None:
        self.ctx.ledger.fingerprint_ended_badly(item.case, state, message, died, peak)

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        return item.units


def run_fingerprints(ctx: RunContext, plan: FingerprintPlan, records: dict[str, CaseRecord],
                     dataset_json: dict[str, Any], reader_writer: str) -> Any:
    scheduler = Scheduler(ctx.settings.num_workers_fingerprint or ctx.workers,
                          shrink_after_deaths=ctx.pool.on_this_machine)
    for w in plan.work:
        rec = records.get(w.case)
        header = rec.header if rec else None
        units = {"fingerprint": fingerprint_units(header, list(w.files.images))}
        deaths = rec.fingerprint.deaths if rec and rec.fingerprint else 0
        # the foreground samples nnU-Net draws (10e7 / cases per channel) weigh more than the image when cases
        # are few and small
        channels = max(len(w.files.images), int((header or {}).get("components") or 1))
        fixed = SAMPLE_BYTES * plan.num_samples * channels
        scheduler.add(w, ctx.estimator.estimate(units) + fixed, units, deaths=deaths, fixed=fixed)
    return ctx.run_stage("Fingerprint", scheduler, FingerprintHandler(ctx, plan, reader_writer, dataset_json),
                         plan.up_to_date)


def aggregate(ctx: RunContext, plan: FingerprintPlan, cases: dict[str, CaseFiles], dataset_json: dict[str, Any],
              records: dict[str, CaseRecord]) -> tuple[str, list[str]]:
    """Writes dataset_fingerprint.json from every case whose fingerprint is done, in nnU-Net's case order.

    Returns the file's checksum and the cases left out (their fingerprint failed or is quarantined).
    """
    good, left_out = [], []
    for name in cases:
        fp = records[name].fingerprint if name in records else None
        if fp is not None and fp.state == TaskState.done and plan.usable(fp.key) and fp.result_sha256:
            good.append((name, fp.result_file, fp.result_sha256, made_for(fp.key or "")))
        else:
            left_out.append(name)
    if not good:
        raise DatasetError(f"no case of {ctx.layout.name} could be fingerprinted",
                           "see the errors above, or `nnresume status` for each case's reason")
    if left_out:
        log.warning("the dataset fingerprint leaves out %d case(s) whose fingerprint failed: %s", len(left_out),
                    ", ".join(left_out[:10]) + (" ..." if len(left_out) > 10 else ""))
    key = key_of({"fingerprint": plan.key, "cases": [(n, sha) for n, _, sha, _ in good],
                  "channels": num_channels(dataset_json)})
    target = ctx.layout.fingerprint_json
    art = ctx.ledger.get_artifact(FINGERPRINT_JSON)
    if art is not None and art.key == key and target.is_file() and atomic.file_digest(target) == art.sha256:
        log.debug("dataset fingerprint up to date")
        return art.sha256, left_out
    need = (num_channels(dataset_json) + 2) * 4 * 10**8
    if need > ctx.budget:
        log.warning("aggregating the dataset fingerprint needs about %s (nnU-Net samples 10e7 foreground voxels per "
                    "channel); the budget is %s", format_bytes(need), format_bytes(ctx.budget))
    log.info("Writing %s from %d case(s)", target.name, len(good))
    results = tuple((name, str(ctx.layout.work / str(rel)), sha, count) for name, rel, sha, count in good)
    # on this machine the step may use what the budget leaves free to run its statistics side by side
    room = max(0, ctx.budget - ctx.pool.readings().tree) if ctx.pool.on_this_machine else 0
    result = ctx.run_one(AggregateTask(f"aggregate-{ctx.run_id}", results, dataset_json,
                                       str(ctx.staging / "aggregate"), plan.num_samples, room))
    place_artifact(result.staged, target, "fingerprint_aggregate")
    sha = result.staged.sha256
    ctx.ledger.set_artifact(FINGERPRINT_JSON, key, result.staged.size, sha, ctx.run_id,
                            {"cases": len(good), "left_out": left_out})
    return sha, left_out
