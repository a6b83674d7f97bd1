"""Preprocessing against given plans (`-plans_name`, as `nnUNetv2_preprocess -plans_name`), the steps on their own,
and what is wrong with given plans said before anything is written.

nnU-Net's side is one reference job: on nnU-Net's own SMALL folder, `nnUNetv2_plan_experiment -overwrite_plans_name`
(the dataset's own plans under another name), `nnUNetv2_move_plans_between_datasets` from LOWRES (other sizes,
spacings and intensities: the fine-tuning path), and a hand-edited copy of SMALL's plans, each then preprocessed by
`nnUNetv2_preprocess -plans_name`. The entry points run in one interpreter (they are the commands' own functions),
which spares three start-ups.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from nnresume.compare import compare_folders
from nnresume.io.atomic import file_digest

from .conftest import (
    EDITED_SPACING,
    LOWRES,
    SMALL,
    Workspace,
    env_for,
    last_run,
    ledger_query,
    redone,
    run_nnresume,
    shared_raw,
)
from .references import Lane, References, job

pytestmark = pytest.mark.slow

GIVEN = ("OwnPlans", "LowresPlans", "Edited")
DID = str(SMALL.dataset_id)

_NNUNET = """
import sys
from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_experiment_entry, preprocess_entry
from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
    entry_point_move_plans_between_datasets)

def run(fn, *argv):
    sys.argv = ["nnunet", *argv]
    fn()

run(plan_experiment_entry, "-d", "{small}", "-overwrite_plans_name", "OwnPlans")
run(entry_point_move_plans_between_datasets, "-s", "{lowres}", "-t", "{small}", "-sp", "nnUNetPlans",
    "-tp", "LowresPlans")
for name in {given!r}:
    run(preprocess_entry, "-d", "{small}", "-plans_name", name, "-c", "3d_fullres", "-np", "1", "--no_pbar")
"""


def edited_plans(plans: dict, name: str = "Edited") -> dict:
    """SMALL's plans under another name with 3d_fullres's spacing edited by hand."""
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = name
    for conf in plans["configurations"].values():
        if "data_identifier" in conf:
            conf["data_identifier"] = conf["data_identifier"].replace("nnUNetPlans", name)
    plans["configurations"]["3d_fullres"]["spacing"] = EDITED_SPACING
    return plans


def _given_plans(references: References, folder: Path, lane: Lane) -> Path:
    pp = folder / "pp"
    small = pp / SMALL.folder_name
    shutil.copytree(references.get("small"), small, ignore=shutil.ignore_patterns("nnUNetPlans_*"))
    (pp / LOWRES.folder_name).mkdir(parents=True)
    shutil.copy(references.get("lowres") / "nnUNetPlans.json", pp / LOWRES.folder_name)
    plans = json.loads((small / "nnUNetPlans.json").read_text())
    (small / "Edited.json").write_text(json.dumps(edited_plans(plans), indent=4))
    script = _NNUNET.format(small=SMALL.dataset_id, lowres=LOWRES.dataset_id, given=GIVEN)
    lane.run([sys.executable, "-c", script], env_for(shared_raw(references), pp))
    return small


job("given-plans", _given_plans, requires=("small", "lowres"), cost=30)


def _attempts(ledger: Path, stage: str, after_run: int = 0) -> list[str]:
    return [c for (c,) in ledger_query(ledger, "select case_name from attempts where stage=? and run_id>? "
                                               "order by case_name", (stage, after_run))]


@pytest.mark.references("given-plans")
def test_given_plans_are_used_as_they_are_and_a_change_redoes_what_it_changed(finished_small: Workspace,
                                                                             references: References) -> None:
    made = references.get("given-plans")
    raw, pp, ds, ledger = finished_small.raw, finished_small.pp, finished_small.dataset, finished_small.ledger
    for name in GIVEN:
        shutil.copy(made / f"{name}.json", ds)
    digests = {name: file_digest(ds / f"{name}.json") for name in GIVEN}
    fingerprint = file_digest(ds / "dataset_fingerprint.json")
    before = last_run(ledger)
    for name in GIVEN:
        r = run_nnresume(raw, pp, "preprocess", "-d", DID, "-plans_name", name, "-c", "3d_fullres", "--no-pbar")
        assert "Traceback" not in r.stderr and "Planning" not in r.stderr, r.stderr
        assert compare_folders(ds, made, [f"{name}_3d_fullres"]) == [], name
    assert {name: file_digest(ds / f"{name}.json") for name in GIVEN} == digests, "given plans were written"
    assert file_digest(ds / "dataset_fingerprint.json") == fingerprint
    assert _attempts(ledger, "fingerprint", before) == [], "SMALL's fingerprints were computed again"

    # an edit of the given file: the dry run says what changed and for which cases; the run redoes exactly those
    plans = json.loads((ds / "Edited.json").read_text())
    old_patch = plans["configurations"]["3d_fullres"]["patch_size"]
    plans["configurations"]["3d_fullres"]["patch_size"] = [p // 2 for p in old_patch]
    (ds / "Edited.json").write_text(json.dumps(plans, indent=4))
    args = ("preprocess", "-d", DID, "-plans_name", "Edited", "-c", "3d_fullres", "--no-pbar")
    dry = run_nnresume(raw, pp, *args, "--dry-run").stdout
    assert f"plans changed: 3d_fullres patch_size {json.dumps(old_patch)} -> " in dry, dry
    assert f"{SMALL.num_cases} configuration changed" in dry, dry
    status = run_nnresume(raw, pp, "status", "-d", DID).stdout
    assert f"Edited.json: 3d_fullres patch_size {json.dumps(old_patch)} -> " in status, status
    run_nnresume(raw, pp, *args)
    assert redone(ledger, last_run(ledger)) == {(f"small_{i:04d}", "Edited_3d_fullres")
                                                for i in range(SMALL.num_cases)}
    assert json.loads((ds / "Edited.json").read_text()) == plans

    # a ninth case: with given plans it costs its own fingerprint and outputs, nothing else
    src = raw / SMALL.folder_name
    shutil.copy(src / "imagesTr" / "small_0003_0000.nii.gz", src / "imagesTr" / "small_0008_0000.nii.gz")
    shutil.copy(src / "labelsTr" / "small_0003.nii.gz", src / "labelsTr" / "small_0008.nii.gz")
    dj = json.loads((src / "dataset.json").read_text())
    dj["numTraining"] = SMALL.num_cases + 1
    (src / "dataset.json").write_text(json.dumps(dj, indent=4))
    grown = last_run(ledger)
    run_nnresume(raw, pp, *args)
    assert _attempts(ledger, "fingerprint", grown) == ["small_0008"]
    assert redone(ledger, last_run(ledger)) == {("small_0008", "Edited_3d_fullres"),
                                                ("small_0008", "gt_segmentations")}


def test_what_is_wrong_with_given_plans_is_said_before_anything_is_written(finished_small: Workspace) -> None:
    raw, pp, ds = finished_small.raw, finished_small.pp, finished_small.dataset
    plans = json.loads((ds / "nnUNetPlans.json").read_text())
    (ds / "Broken.json").write_text('{"configurations": {')
    two = json.loads(json.dumps(plans))  # another dataset's plans for two channels (CT and T2)
    two["plans_name"] = "TwoChannels"
    two["foreground_intensity_properties_per_channel"]["1"] = two["foreground_intensity_properties_per_channel"]["0"]
    for conf in two["configurations"].values():
        if "normalization_schemes" in conf:
            conf["normalization_schemes"] = conf["normalization_schemes"] * 2
            conf["use_mask_for_norm"] = conf["use_mask_for_norm"] * 2
    (ds / "TwoChannels.json").write_text(json.dumps(two))
    unknown = edited_plans(plans, "Unknown")
    unknown["configurations"]["3d_fullres"]["preprocessor_name"] = "DefaultPreprocesor"
    (ds / "Unknown.json").write_text(json.dumps(unknown))

    def listing() -> dict[str, float]:
        return {str(p.relative_to(ds)): p.stat().st_mtime for p in ds.rglob("*")
                if ".nnresume" not in p.parts and not p.name.startswith("nnresume.sqlite")}

    before = listing()
    cases = [
        (("-plans_name", "nnUNetPlan"), "nnUNetPlan.json does not exist (plans in that folder: TwoChannels, Unknown, "
                                               "nnUNetPlans)"),
        (("-plans_name", "Broken"), "Broken.json is not valid JSON"),
        (("-plans_name", "TwoChannels"), "TwoChannels.json was made for 2 channel(s) but Dataset901_Small has 1"),
        (("-plans_name", "nnUNetPlans", "-c", "3d_lowres"), "plans nnUNetPlans.json have no configuration '3d_lowres'"),
        (("-plans_name", "Unknown", "-c", "3d_fullres"), "Unknown.json: preprocessor_name DefaultPreprocesor: no "
                                                        "preprocessor class"),
        (("-plans_name", "nnUNetPlans", "-pl", "nnUNetPlannerResEncM"), "-pl belong(s) to planning"),
    ]
    for args, message in cases:
        r = run_nnresume(raw, pp, "preprocess", "-d", DID, *args, "--no-pbar", expect=2)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert listing() == before, "a run refused for its plans changed the dataset's folder"


@pytest.mark.references("small")
def test_each_step_on_its_own(raw_root: Path, references: References, tmp_path: Path) -> None:
    """extract-fingerprint writes the fingerprint and no plans; plan-experiment plans without preprocessing (and
    does not analyse a case again); `preprocess --no_pp` is plan-experiment; `preprocess -plans_name` then
    preprocesses; the end is nnU-Net's SMALL."""
    from .conftest import SMALL_FOLDERS, copy_dataset

    raw, pp = copy_dataset(raw_root, SMALL, tmp_path / "raw"), tmp_path / "pp"
    ds, ledger = pp / SMALL.folder_name, pp / SMALL.folder_name / "nnresume.sqlite"
    run_nnresume(raw, pp, "extract-fingerprint", "-d", DID, "--no-pbar")
    assert (ds / "dataset_fingerprint.json").is_file() and not (ds / "nnUNetPlans.json").exists()
    assert len(_attempts(ledger, "fingerprint")) == SMALL.num_cases
    r = run_nnresume(raw, pp, "plan-experiment", "-d", DID, "--no-pbar")
    assert (ds / "nnUNetPlans.json").is_file() and not list(ds.glob("nnUNetPlans_*")), r.stderr
    assert len(_attempts(ledger, "fingerprint")) == SMALL.num_cases
    r = run_nnresume(raw, pp, "preprocess", "-d", DID, "--no_pp", "--no-pbar")
    assert "Planning" not in r.stderr and not list(ds.glob("nnUNetPlans_*"))
    run_nnresume(raw, pp, "preprocess", "-d", DID, "-plans_name", "nnUNetPlans", "-c", "2d", "3d_fullres",
                 "--no-pbar")
    assert compare_folders(ds, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []

    # a fingerprint file that no longer describes the dataset (nnU-Net would reuse it without --clean): check says so
    src = raw / SMALL.folder_name
    shutil.copy(src / "imagesTr" / "small_0003_0000.nii.gz", src / "imagesTr" / "small_0008_0000.nii.gz")
    shutil.copy(src / "labelsTr" / "small_0003.nii.gz", src / "labelsTr" / "small_0008.nii.gz")
    found = json.loads(run_nnresume(raw, pp, "check", "-d", DID, "--json", expect=None).stdout)["datasets"][0]
    assert any("describes 8 case(s) but the dataset has 9" in f["message"] for f in found["findings"]), found
