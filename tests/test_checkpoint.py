"""`nnresume checkpoint` on the prediction tests' model (tests/models.py): a checkpoint cut short, one saved from a
torch.compile'd network (`_orig_mod.` keys) repaired into a copy that nnU-Net's own loading takes (through
`nnresume predict`, whose device process loads it with nnU-Net's predictor), and checkpoints made for another network
or trainer, for which no repair is offered."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nnresume.io.atomic import file_digest
from nnresume.synthetic import case_name

from .conftest import References, run_nnresume
from .models import CONFIG, SPEC, Model

DID = str(SPEC.dataset_id)


def test_prefixes_are_counted_and_stripped_into_a_copy(tmp_path: Path) -> None:
    import torch

    from nnresume.train import checkpoint as doctor

    weights = {"_orig_mod.a.weight": torch.ones(2), "module._orig_mod.b.bias": torch.zeros(3), "c": torch.ones(1)}
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"network_weights": weights, "trainer_name": "T", "current_epoch": 7,
                "init_args": {"configuration": "2d", "fold": 0, "plans": {"plans_name": "P"}}}, str(path))
    d = doctor.diagnose(path, trainer="T")
    assert d.readable and d.epoch == 7 and d.prefixed == {"_orig_mod.": 1, "module._orig_mod.": 1}
    assert d.fixable and d.exit_code == doctor.EXIT_PROBLEMS and len(d.problems) == 2
    fixed = torch.load(str(doctor.fix(path)), map_location="cpu", weights_only=False)["network_weights"]
    assert list(fixed) == ["a.weight", "b.bias", "c"]
    assert torch.equal(fixed["b.bias"], weights["module._orig_mod.b.bias"])
    assert list(torch.load(str(path), weights_only=False)["network_weights"]) == list(weights)  # untouched
    assert not doctor.diagnose(path, trainer="U").fixable  # another trainer: no repair is safe


@pytest.mark.slow
@pytest.mark.references("predict-model")
def test_checkpoint_doctor(references: References, tmp_path: Path) -> None:
    import torch

    model: Model = references.get("predict-model")
    folder = tmp_path / "model"
    shutil.copytree(model.results / SPEC.folder_name / f"nnUNetTrainer__nnUNetPlans__{CONFIG}", folder,
                    ignore=shutil.ignore_patterns("fold_1"))
    fold = folder / "fold_0"
    final = fold / "checkpoint_final.pth"
    # the network the model was made with, as a user's nnUNet_preprocessed holds its plans
    pp = tmp_path / "pp" / SPEC.folder_name
    pp.mkdir(parents=True)
    shutil.copy(folder / "plans.json", pp / "nnUNetPlans.json")
    shutil.copy(folder / "dataset.json", pp / "dataset.json")

    def doctor(*args: str, expect: int) -> str:
        r = run_nnresume(model.raw, tmp_path / "pp", "checkpoint", *args, expect=expect)
        assert "Traceback" not in r.stderr, r.stderr
        return r.stdout + r.stderr

    assert "nothing wrong found" in doctor(str(final), "-d", DID, "-tr", "nnUNetTrainer", expect=0)

    latest = fold / "checkpoint_latest.pth"
    latest.write_bytes(final.read_bytes()[:final.stat().st_size // 2])
    text = doctor(str(latest), expect=1)
    assert "checkpoint_latest.pth cannot be read" in text and "truncated or damaged" in text, text
    assert "checkpoint_final.pth" in text, text  # the others beside it are named

    ckpt = torch.load(str(final), map_location="cpu", weights_only=False)
    ckpt["network_weights"] = {"_orig_mod." + k: v for k, v in ckpt["network_weights"].items()}
    compiled = fold / "compiled.pth"
    torch.save(ckpt, str(compiled))
    digest = file_digest(compiled)
    n = len(ckpt["network_weights"])
    text = doctor(str(compiled), "-d", DID, expect=3)
    assert f"{n} of {n} weights start with '_orig_mod.'" in text, text
    text = doctor(str(compiled), "-d", DID, "--fix", expect=0)
    assert "repaired copy written" in text and file_digest(compiled) == digest, text
    assert "nothing wrong found" in doctor(str(fold / "compiled.fixed.pth"), "-d", DID, expect=0)
    # nnU-Net's loader takes the repaired copy: its predictions are those of the original checkpoint
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    case = case_name(SPEC, 0)
    for f in model.inputs.glob(f"{case}_*"):
        shutil.copy(f, inputs)
    run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(inputs), "-o", str(out), "-m", str(folder),
                 "-f", "0", "-chk", "compiled.fixed.pth", "-device", "cpu", "--no-pbar")
    import SimpleITK as sitk

    ours, ref = (sitk.GetArrayFromImage(sitk.ReadImage(str(p / f"{case}.nii.gz"))) for p in (out, model.reference))
    assert (ours == ref).all()

    # made for another network (the dataset now has one channel) or another trainer: said, and not repaired
    dj = json.loads((pp / "dataset.json").read_text())
    dj["channel_names"] = {"0": "CT"}
    (pp / "dataset.json").write_text(json.dumps(dj))
    (fold / "compiled.fixed.pth").unlink()
    text = doctor(str(compiled), "-d", DID, "-tr", "nnUNetTrainerNoMirroring", "--fix", expect=3)
    assert "input channels 2 in the checkpoint, 1 for" in text, text
    assert "trained with nnUNetTrainer, not nnUNetTrainerNoMirroring (-tr)" in text, text
    assert "no repair is safe" in text and not (fold / "compiled.fixed.pth").exists(), text
