"""`nnresume checkpoint`: what is wrong with an nnU-Net checkpoint, in plain words, and a repaired copy if safe.

nnU-Net's `save_checkpoint` writes a dict with `torch.save`: `network_weights` (the state dict), the optimizer's,
grad scaler's and logger's states, `current_epoch`, `init_args` (the plans, configuration, fold and dataset.json the
trainer was made with) and `trainer_name`. Loading one for `--c` or `-pretrained_weights` fails with a raw error when
the file was cut short (a kill during the save), when its keys carry a wrapper's prefix that nnU-Net does not strip
(`_orig_mod.` from `torch.compile`; nnU-Net strips `module.` from DDP itself, and only where the key is otherwise
unknown), or when it was trained for another network (other input channels, classes or stages), trainer or plans.

What is compared needs nothing but the file and, with `-d`, the plans and dataset.json in nnUNet_preprocessed: the
network's shape follows from them (input channels from dataset.json's channels, outputs from its labels, the stages
from the configuration's architecture). torch is imported only when this runs.

A repair is offered only for prefixes: the weights are the same tensors under nnU-Net's names. The copy is written
beside the original (`<name>.fixed.pth`), staged, fsynced, loaded back and renamed; the original is never touched.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import format_bytes
from ..dataset import num_channels, resolve_configuration
from ..io import atomic

PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's, torch.compile's
EXIT_OK, EXIT_UNREADABLE, EXIT_PROBLEMS = 0, 1, 3


@dataclass
class Diagnosis:
    path: str
    size: int
    readable: bool = False
    epoch: Optional[int] = None
    trainer: Optional[str] = None
    plans: Optional[str] = None
    configuration: Optional[str] = None
    fold: Any = None
    dataset: Optional[str] = None
    weights: int = 0
    prefixed: dict[str, int] = field(default_factory=dict)  # leading prefix -> number of weight keys with it
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixable: bool = False  # every problem is a prefix, so a repaired copy is safe

    @property
    def exit_code(self) -> int:
        return EXIT_UNREADABLE if not self.readable else EXIT_PROBLEMS if self.problems else EXIT_OK


def load(path: Path) -> Any:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=False)


def _leading_prefix(key: str) -> str:
    found = ""
    while True:
        for p in PREFIXES:
            if key.startswith(p):
                found, key = found + p, key[len(p):]
                break
        else:
            return found


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    return {k[len(_leading_prefix(k)):]: v for k, v in state.items()}


def _expected(preprocessed: Path, dataset: str, plans_name: str) -> tuple[dict, dict]:
    folder = preprocessed / dataset
    plans_file, dataset_json = folder / f"{plans_name}.json", folder / "dataset.json"
    try:
        return json.loads(plans_file.read_text()), json.loads(dataset_json.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read {plans_file} and {dataset_json}: {e}") from None


def _shape(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str) -> dict[str, Any]:
    """What decides the network's tensors: input channels, outputs, and the architecture's arguments."""
    conf = resolve_configuration(plans, configuration)
    arch = conf.get("architecture") or {}
    kwargs = dict(arch.get("arch_kwargs") or {})
    labels = dataset_json.get("labels") or {}
    regions = any(isinstance(v, (list, tuple)) for v in labels.values())
    outputs = len(labels) - (1 if regions else 0) - (1 if "ignore" in labels else 0)
    return {"input channels": num_channels(dataset_json), "outputs": outputs,
            "network": arch.get("network_class_name"), "stages": kwargs.get("n_stages"),
            "features per stage": kwargs.get("features_per_stage"), "kernel sizes": kwargs.get("kernel_sizes"),
            "strides": kwargs.get("strides")}


def diagnose(path: Path, preprocessed: Optional[Path] = None, dataset: Optional[str] = None,
             plans_name: Optional[str] = None, configuration: Optional[str] = None,
             trainer: Optional[str] = None) -> Diagnosis:
    """Everything wrong with the checkpoint at `path`; with `dataset`, compared with the network that dataset's
    plans (`plans_name`, default nnUNetPlans) build for `configuration` (default: the checkpoint's)."""
    d = Diagnosis(str(path), path.stat().st_size if path.is_file() else 0)
    if not path.is_file():
        d.problems.append(f"{path} does not exist")
        return d
    try:
        ckpt = load(path)
    except Exception as e:  # torch's errors for a damaged file are RuntimeError, EOFError, pickle's and zipfile's
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        d.problems.append(f"{path.name} cannot be read ({format_bytes(d.size)}): truncated or damaged ({why}); "
                          "resume from another checkpoint, e.g. checkpoint_best.pth, or train again")
        siblings = sorted(p.name for p in path.parent.glob("checkpoint*.pth") if p != path)
        if siblings:
            d.notes.append(f"other checkpoints beside it: {', '.join(siblings)} (check them the same way)")
        return d
    d.readable = True
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        d.problems.append(f"{path.name} is not an nnU-Net checkpoint (no 'network_weights')")
        return d
    init = ckpt.get("init_args") or {}
    saved_plans, saved_json = init.get("plans") or {}, init.get("dataset_json") or {}
    d.epoch, d.trainer = ckpt.get("current_epoch"), ckpt.get("trainer_name")
    d.plans, d.configuration, d.fold = saved_plans.get("plans_name"), init.get("configuration"), init.get("fold")
    d.dataset = saved_plans.get("dataset_name")
    weights = ckpt["network_weights"]
    d.weights = len(weights)
    for key in weights:
        prefix = _leading_prefix(key)
        if prefix:
            d.prefixed[prefix] = d.prefixed.get(prefix, 0) + 1
    for prefix, n in sorted(d.prefixed.items()):
        if "_orig_mod." in prefix:
            d.problems.append(f"{n} of {d.weights} weights start with '{prefix}' (saved from a torch.compile'd "
                              "network): nnU-Net's loading does not strip it and fails with missing and unexpected "
                              "keys; --fix writes a copy without it")
        else:
            d.notes.append(f"{n} of {d.weights} weights start with '{prefix}' (saved from a DDP-wrapped network): "
                           "nnU-Net strips it when loading; --fix writes a copy without it")
    only_prefixes = len(d.problems)
    if trainer and d.trainer and trainer != d.trainer:
        d.problems.append(f"trained with {d.trainer}, not {trainer} (-tr): resuming needs the trainer that saved it; "
                          f"as -pretrained_weights, only the network's weights are taken")
    if dataset:
        if preprocessed is None:
            raise FileNotFoundError("nnUNet_preprocessed is not set: it is needed with -d")
        plans, dataset_json = _expected(preprocessed, dataset, plans_name or "nnUNetPlans")
        conf = configuration or d.configuration or ""
        if plans_name and d.plans and plans_name != d.plans:
            d.problems.append(f"trained with plans {d.plans}, not {plans_name} (-p)")
        if configuration and d.configuration and configuration != d.configuration:
            d.problems.append(f"trained for configuration {d.configuration}, not {configuration} (-c)")
        if conf not in plans.get("configurations", {}):
            d.problems.append(f"{plans.get('plans_name')} has no configuration {conf!r}")
        elif saved_plans and (d.configuration or conf) in saved_plans.get("configurations", {}):
            mine = _shape(saved_plans, saved_json, d.configuration or conf)
            theirs = _shape(plans, dataset_json, conf)
            for what in mine:
                if mine[what] != theirs[what]:
                    d.problems.append(f"the network differs: {what} {mine[what]} in the checkpoint, {theirs[what]} "
                                      f"for {dataset} with {plans.get('plans_name')} {conf}")
        else:
            d.notes.append(f"the checkpoint's own plans lack configuration {conf!r}: the network was not compared")
    d.fixable = bool(d.prefixed) and len(d.problems) == only_prefixes
    if d.prefixed and not d.fixable:
        d.notes.append("no repair is safe: besides the prefixes, the checkpoint was made for another network, "
                       "trainer or plans")
    return d


def fix(path: Path) -> Path:
    """A copy of the checkpoint with its weights' prefixes stripped, beside it, written atomically and loaded back
    before it takes its name. The original is not touched."""
    import torch

    ckpt = load(path)
    ckpt["network_weights"] = strip_prefixes(ckpt["network_weights"])
    target = path.with_name(path.stem + ".fixed.pth")
    tmp = path.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(ckpt, str(tmp))
        atomic.fsync_file(tmp)
        again = load(tmp)
        if list(again["network_weights"]) != list(ckpt["network_weights"]):
            raise OSError(f"{tmp} did not read back as written")
        os.replace(tmp, target)
        atomic.fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def render(d: Diagnosis) -> str:
    lines = [f"{d.path}: {format_bytes(d.size)}"]
    if d.readable and d.trainer:
        lines.append(f"  {d.trainer}, plans {d.plans}, configuration {d.configuration}, fold {d.fold}, dataset "
                     f"{d.dataset}, saved after epoch {d.epoch}; {d.weights} weight tensors")
    lines += [f"  problem: {p}" for p in d.problems]
    lines += [f"  note: {n}" for n in d.notes]
    if not d.problems:
        lines.append("  nothing wrong found (the file read and its keys, and with -d the network it was made for, "
                     "compared)")
    return "\n".join(lines)


def as_dict(d: Diagnosis) -> dict[str, Any]:
    return asdict(d) | {"exit_code": d.exit_code}
