"""The ledger's named operations: grouped writes (one transaction for many tasks) leave exactly what one transaction
per operation leaves, and `status_rows` counts what is there."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from nnresume.ledger.models import RunStatus, TaskState
from nnresume.ledger.repository import Ledger
from nnresume.tasks import InputFileInfo

IDENTS = ("nnUNetPlans_2d", "gt_segmentations")


def _files(name: str) -> list[InputFileInfo]:
    return [InputFileInfo("image", 0, f"/raw/{name}_0000.png", 10, 1, "a" * 64),
            InputFileInfo("label", -1, f"/raw/{name}.png", 5, 1, "b" * 64)]


def _work(ledger: Ledger, run_id: int, commit: Any) -> None:
    """A stage's worth of operations on three cases: a new one, one retried after a death, one that fails."""
    for name in ("a", "b", "c"):
        ledger.fingerprint_started(name, run_id, 100)
    commit()
    ledger.fingerprint_done("a", run_id, "key", "dig-a", _files("a"), "fp/a.pkl", 7, "s" * 64, [1, 4, 4],
                            [1.0, 1.0], 0.5, 1000, {"shape": [4, 4]})
    ledger.fingerprint_ended_badly("b", TaskState.pending, "worker died", died=True, peak_rss=5000)
    commit()
    ledger.fingerprint_started("b", run_id, 200)
    ledger.fingerprint_done("b", run_id, "key", "dig-b", _files("b"), "fp/b.pkl", 8, "t" * 64, [1, 5, 5],
                            [1.0, 1.0], 0.7, 2000, None)
    ledger.fingerprint_ended_badly("c", TaskState.quarantined, "unreadable", died=False)
    commit()
    ledger.ensure_outputs([(n, i, "2d") for n in ("a", "b") for i in IDENTS])
    for name in ("a", "b"):
        ledger.outputs_started(name, [(i, "2d", "h") for i in IDENTS], f"dig-{name}", run_id, 300)
    commit()
    for ident in IDENTS:
        ledger.output_done("a", ident, "2d", run_id, "h", "dig-a", [{"name": "a.b2nd", "size": 1, "sha256": "x"}],
                           0.2, 3000 if ident == IDENTS[0] else 10)
    ledger.outputs_ended_badly("b", list(IDENTS), TaskState.pending, "worker died", died=True, peak_rss=9000)
    commit()
    ledger.outputs_started("b", [(IDENTS[0], "2d", "h")], "dig-b", run_id, 300)
    ledger.output_done("b", IDENTS[0], "2d", run_id, "h", "dig-b", [{"name": "b.b2nd", "size": 2, "sha256": "y"}],
                       0.3, 4000)


def _state(ledger: Ledger) -> dict[str, Any]:
    out = {}
    for name, rec in ledger.load_cases().items():
        d = dataclasses.asdict(rec)
        for o in d["outputs"].values():
            o.pop("updated_at")
        out[name] = d
    return out


@pytest.mark.parametrize("commits", ["at the end", "between steps"])
def test_grouped_writes_leave_what_single_writes_leave(tmp_path: Path, commits: str) -> None:
    single = Ledger.open(str(tmp_path / "single.sqlite"))
    run = single.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    _work(single, run, lambda: None)

    grouped = Ledger.open(str(tmp_path / "grouped.sqlite"))
    run = grouped.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    grouped.start_group()
    _work(grouped, run, grouped.commit_group if commits == "between steps" else lambda: None)
    assert grouped.group_pending
    grouped.end_group()
    assert not grouped.group_pending

    expected = _state(single)
    assert _state(grouped) == expected
    assert expected["b"]["fingerprint"]["attempts"] == 2 and expected["b"]["fingerprint"]["deaths"] == 0
    assert expected["b"]["outputs"][IDENTS[0]]["attempts"] == 2
    assert expected["b"]["outputs"][IDENTS[1]]["deaths"] == 1
    assert expected["c"]["fingerprint"]["state"] == TaskState.quarantined


def test_a_group_not_committed_leaves_nothing(tmp_path: Path) -> None:
    ledger = Ledger.open(str(tmp_path / "l.sqlite"))
    run = ledger.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    ledger.start_group()
    ledger.fingerprint_started("a", run, 100)
    ledger.commit_group()
    ledger.fingerprint_ended_badly("a", TaskState.failed, "bad", died=False)
    ledger._drop_group()  # what a failed commit does: the transaction is rolled back
    ledger._grouping = False
    fp = ledger.load_cases()["a"].fingerprint
    assert fp is not None and fp.state == TaskState.running and fp.error is None and fp.attempts == 1


def test_status_rows_counts_and_names_the_largest(tmp_path: Path) -> None:
    ledger = Ledger.open(str(tmp_path / "l.sqlite"))
    run = ledger.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    _work(ledger, run, lambda: None)
    ledger.finish_run(run, RunStatus.completed, None)
    r = ledger.status_rows(list(IDENTS), run)
    assert r.n_cases == 3
    assert r.fingerprint_counts == {"done": 2, "quarantined": 1}
    assert sorted(r.fingerprint_peaks) == [1000, 2000]
    assert r.output_counts == {IDENTS[0]: {"done": 2}, IDENTS[1]: {"done": 1, "pending": 1}}
    assert sorted(r.output_peaks[IDENTS[0]]) == [3000, 4000]
    assert r.output_largest[IDENTS[0]] == [(4000, "b"), (3000, "a")]
    assert sorted(r.output_durations[IDENTS[0]]) == [0.2, 0.3]
    assert r.cases_complete == 1  # b is not done in gt_segmentations
    assert [(name, state) for _, name, state, _ in r.fingerprint_failures] == [("c", TaskState.quarantined)]


def test_a_result_replacing_files_waits_for_the_commit_of_its_start(tmp_path: Path) -> None:
    """A rerun's result whose file replaces a vouched one is placed only after the ledger has committed that the
    old file is no longer vouched for (the row marked running), without a commit of its own."""
    from nnresume.preprocess.context import GroupCommit

    path = str(tmp_path / "l.sqlite")
    ledger = Ledger.open(path)
    run = ledger.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    folder = tmp_path / "fingerprints"
    folder.mkdir()
    (folder / "a.pkl").write_text("old")
    ledger.start_group()
    group = GroupCommit(ledger, window=3600)
    ledger.fingerprint_started("a", run, 100)
    ledger.fingerprint_started("b", run, 100)
    placed: list[str] = []

    def place(case: str) -> None:
        placed.append(case)
        ledger.fingerprint_done(case, run, "key", "d", [], f"fp/{case}.pkl", 3, "s" * 64, [1], [1.0], 0.1, 1, None)

    assert group.later("a", folder, ["a.pkl"], lambda: place("a"))  # replaces a file, start not committed
    assert not group.later("b", folder, ["b.pkl"], lambda: place("b"))  # nothing to replace: placed at once
    place("b")
    assert placed == ["b"]
    reader = Ledger.open(path, create=False)
    assert "a" not in reader.load_cases()  # nothing committed yet

    group.flush()  # commits the starts, then places a: its done mark starts the next group
    assert placed == ["b", "a"]
    fp = reader.load_cases()["a"].fingerprint
    assert fp is not None and fp.state == TaskState.running
    assert ledger.group_pending and not ledger.case_pending("b")

    ledger.fingerprint_started("c", run, 100)
    (folder / "c.pkl").write_text("old")
    assert group.later("c", folder, ["c.pkl"], lambda: place("c"))
    group.flush(final=True)  # the end of a stage: what waited is placed and committed too
    assert placed == ["b", "a", "c"] and not ledger.group_pending
    ledger.end_group()
    states = {n: r.fingerprint.state for n, r in reader.load_cases().items() if r.fingerprint}
    assert states == {"a": TaskState.done, "b": TaskState.done, "c": TaskState.done}


def test_outputs_keyed_on_the_earlier_hash_are_rekeyed(tmp_path: Path) -> None:
    from nnresume.ledger.repository import ConfigurationRecord

    ledger = Ledger.open(str(tmp_path / "l.sqlite"))
    run = ledger.start_run("preprocess", {}, "host", 1, None, "2.x", "0.x", None)
    ledger.ensure_outputs([("a", IDENTS[0], "2d"), ("b", IDENTS[0], "2d")])
    ledger.output_done("a", IDENTS[0], "2d", run, "old", "d", [], 0.1, 1)
    ledger.output_done("b", IDENTS[0], "2d", run, "other", "d", [], 0.1, 1)
    conf = ConfigurationRecord(IDENTS[0], "2d", "P", "new", earlier_hashes=("old", "older"))
    assert conf.keys() == ("new", "old", "older")
    assert ledger.rekey_outputs([conf]) == 1
    hashes = {n: r.outputs[IDENTS[0]].config_hash for n, r in ledger.load_cases().items()}
    assert hashes == {"a": "new", "b": "other"}


def test_group_window_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnresume.errors import UsageError
    from nnresume.preprocess.context import GROUP_WINDOW, WINDOW_ENV, group_window

    monkeypatch.delenv(WINDOW_ENV, raising=False)
    assert group_window() == GROUP_WINDOW
    monkeypatch.setenv(WINDOW_ENV, "0")
    assert group_window() == 0.0
    for bad in ("-1", "soon", "61"):
        monkeypatch.setenv(WINDOW_ENV, bad)
        with pytest.raises(UsageError, match=WINDOW_ENV):
            group_window()
