"""The nnU-Net conventions nnresume re-expresses in plain Python agree with nnU-Net's own functions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nnresume import dataset
from nnresume.errors import DatasetError, UsageError

from .conftest import References


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_case_listing_matches_nnunet_on_awkward_names(tmp_path: Path) -> None:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = tmp_path / "Dataset123_Names"
    names = ["a_0000.nii.gz", "a_0001.nii.gz", "b_0001_0000.nii.gz", "c_000_0000.nii.gz", "d_x.nii.gz",
             "e_0000.nii.gz", "e_12345.nii.gz", "f 1_0000.nii.gz", "g_0000.nii", "h_0000.nii.gz.bak",
             "zz_0000.nii.gz", "Z_0000.nii.gz", "10_0000.nii.gz", "9_0000.nii.gz"]
    for n in names:
        _touch(raw / "imagesTr" / n)
    (raw / "imagesTr" / "dir_0000.nii.gz").mkdir()
    dj = {"file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "labels": {"background": 0}}
    theirs = get_filenames_of_train_images_and_targets(str(raw), dj)
    ours = dataset.list_cases(raw, dj)
    assert list(ours) == [str(k) for k in theirs]
    for k, v in theirs.items():
        assert list(ours[str(k)].images) == list(v["images"]) and ours[str(k)].label == v["label"]


def test_case_listing_from_dataset_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "elsewhere"))
    dj = {"file_ending": ".nii.gz", "dataset": {
        "x": {"images": ["imagesTr/x_0000.nii.gz", "$DATA_ROOT/x_0001.nii.gz"], "label": "labelsTr/x.nii.gz"},
        "y": {"images": ["/abs/y_0000.nii.gz"], "label": "/abs/y.nii.gz"}}}
    theirs = get_filenames_of_train_images_and_targets(str(tmp_path), json.loads(json.dumps(dj)))
    ours = dataset.list_cases(tmp_path, dj)
    assert {k: (list(v.images), v.label) for k, v in ours.items()} == \
           {k: (v["images"], v["label"]) for k, v in theirs.items()}


@pytest.mark.slow
@pytest.mark.references("lowres")
def test_configuration_resolution_matches_plans_manager(references: References) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((references.get("lowres") / "nnUNetPlans.json").read_text())
    assert "3d_cascade_fullres" in plans["configurations"]
    pm = PlansManager(plans)
    for name in plans["configurations"]:
        assert dataset.resolve_configuration(plans, name) == pm.get_configuration(name).configuration


def _plans() -> dict:
    return {"plans_name": "P", "transpose_forward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}},
            "configurations": {"3d_fullres": {"data_identifier": "P_3d_fullres", "spacing": [1, 1, 1],
                                              "preprocessor_name": "DefaultPreprocessor"},
                               "2d": {"data_identifier": "P_2d", "spacing": [1, 1]},
                               "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}


def test_config_hash_depends_on_what_changes_outputs() -> None:
    dj = {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}
    base = dataset.config_hash(_plans(), "3d_fullres", dj, "2.8.1")
    assert base == dataset.config_hash(_plans(), "3d_fullres", dict(dj), "2.8.1")
    def edited(edit: Any) -> dict[str, Any]:
        p = _plans()
        edit(p)
        return p

    changed = [
        (edited(lambda p: p["configurations"]["3d_fullres"].update(spacing=[2, 1, 1])), dj, "2.8.1"),
        (edited(lambda p: p.update(plans_name="Q")), dj, "2.8.1"),
        (edited(lambda p: p["foreground_intensity_properties_per_channel"]["0"].update(mean=2.0)), dj, "2.8.1"),
        (_plans(), {**dj, "labels": {"background": 0, "a": 1, "b": 2}}, "2.8.1"),
        (_plans(), dj, "2.8.2"),
    ]
    for plans, d, v in changed:
        assert dataset.config_hash(plans, "3d_fullres", d, v) != base
    # another configuration's edit does not touch this one
    p = edited(lambda p: p["configurations"]["2d"].update(spacing=[3, 3]))
    assert dataset.config_hash(p, "3d_fullres", dj, "2.8.1") == base


def test_config_hash_leaves_out_statistics_no_normalisation_reads() -> None:
    dj = {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}

    def hashes(schemes: list[str], preprocessor: str = "DefaultPreprocessor", mean: float = 1.0) -> tuple[str, str]:
        p = _plans()
        p["configurations"]["3d_fullres"].update(normalization_schemes=schemes, preprocessor_name=preprocessor)
        p["foreground_intensity_properties_per_channel"]["0"]["mean"] = mean
        return (dataset.config_hash(p, "3d_fullres", dj, "2.8.1"),
                dataset.earlier_config_hashes(p, "3d_fullres", dj, "2.8.1")[1])

    z, z_earlier = hashes(["ZScoreNormalization"])
    assert hashes(["ZScoreNormalization"], mean=2.0)[0] == z  # the new sample's mean is read by nothing
    assert hashes(["ZScoreNormalization"], mean=2.0)[1] != z_earlier  # the earlier hash had every statistic
    assert hashes(["CTNormalization"], mean=2.0)[0] != hashes(["CTNormalization"])[0]
    assert hashes(["MyNormalization"], mean=2.0)[0] != hashes(["MyNormalization"])[0]
    custom = hashes(["ZScoreNormalization"], "MyPreprocessor")[0]
    assert hashes(["ZScoreNormalization"], "MyPreprocessor", 2.0)[0] != custom


def test_config_hash_leaves_out_what_only_training_reads() -> None:
    """The planner changes a small dataset's batch size as cases are added (it is capped by the dataset's size); no
    preprocessed file changes with it, or with the network's topology. The patch size sets the arrays' blosc2 chunks:
    it counts. With another preprocessor class, everything counts."""
    dj = {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}

    def hashes(preprocessor: str = "DefaultPreprocessor", **fields: Any) -> tuple[str, tuple[str, ...]]:
        p = _plans()
        p["configurations"]["3d_fullres"].update(preprocessor_name=preprocessor, batch_size=2, patch_size=[8, 8, 8],
                                                 architecture={"n_stages": 4})
        p["configurations"]["3d_fullres"].update(fields)
        return (dataset.config_hash(p, "3d_fullres", dj, "2.8.1"),
                dataset.earlier_config_hashes(p, "3d_fullres", dj, "2.8.1"))

    base, earlier = hashes()
    for training_only in ({"batch_size": 3}, {"architecture": {"n_stages": 5}}, {"median_image_size_in_voxels": [9]}):
        now, before = hashes(**training_only)
        assert now == base, training_only
        assert before[0] != earlier[0], training_only  # the earlier hash had the whole configuration
    assert hashes(patch_size=[8, 8, 16])[0] != base
    assert hashes(spacing=[2, 1, 1])[0] != base
    assert hashes("MyPreprocessor", batch_size=3)[0] != hashes("MyPreprocessor")[0]


def test_circular_inheritance_is_reported() -> None:
    p = _plans()
    p["configurations"]["3d_fullres"]["inherits_from"] = "3d_cascade_fullres"
    with pytest.raises(DatasetError, match="circular"):
        dataset.resolve_configuration(p, "3d_cascade_fullres")


def test_dataset_name_resolution(tmp_path: Path) -> None:
    raw, pp = tmp_path / "raw", tmp_path / "pp"
    (raw / "Dataset007_Seven").mkdir(parents=True)
    (pp / "Dataset070_Seventy").mkdir(parents=True)
    assert dataset.resolve_dataset_name("7", str(raw), str(pp)) == "Dataset007_Seven"
    assert dataset.resolve_dataset_name("007", str(raw), str(pp)) == "Dataset007_Seven"
    assert dataset.resolve_dataset_name("70", str(raw), str(pp)) == "Dataset070_Seventy"
    assert dataset.resolve_dataset_name("Dataset123_X", str(raw), str(pp)) == "Dataset123_X"
    # a -d that names no dataset is a usage error (exit code 2)
    with pytest.raises(UsageError, match="no dataset with id 8"):
        dataset.resolve_dataset_name("8", str(raw), str(pp))
    with pytest.raises(UsageError, match="neither"):
        dataset.resolve_dataset_name("heart", str(raw), str(pp))
    (pp / "Dataset007_Other").mkdir()
    with pytest.raises(UsageError, match="ambiguous"):
        dataset.resolve_dataset_name("7", str(raw), str(pp))


@pytest.mark.parametrize("content, message", [
    (None, "is missing"),
    ("{not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"labels": {"background": 0}, "file_ending": ".nii.gz"}', "no 'channel_names'"),
    ('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}', "no 'labels'"),
    ('{"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".nii.gz"}', "background"),
])
def test_bad_dataset_json_is_a_clear_error(tmp_path: Path, content, message) -> None:
    folder = tmp_path / "Dataset001_X"
    folder.mkdir()
    if content is not None:
        (folder / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as e:
        dataset.load_dataset_json(folder)
    assert "dataset.json" in str(e.value)


def test_foreground_samples_per_case_as_nnunet() -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class Probe(DatasetFingerprintExtractor):
        def __init__(self) -> None:  # only the constant
            self.num_foreground_voxels_for_intensitystats = 10e7

    for n in (1, 3, 7, 1000, 25000):
        assert dataset.num_foreground_samples_per_case(n) == int(Probe().num_foreground_voxels_for_intensitystats // n)
