"""The boundaries the README states, checked on the running code (import-linter checks them on the source in CI)."""
from __future__ import annotations

import subprocess
import sys

ORCHESTRATOR = ["nnresume.cli", "nnresume.session", "nnresume.preprocess.run", "nnresume.preprocess.pipeline",
                "nnresume.predict.run", "nnresume.predict.device_owner", "nnresume.commands.status",
                "nnresume.commands.check", "nnresume.commands.verify", "nnresume.commands.dryrun",
                "nnresume.commands.report", "nnresume.commands.demo", "nnresume.execution.pools.local"]


def test_the_orchestrator_never_imports_nnunetv2() -> None:
    """Importing nnunetv2 costs ~4 s of CPU: status, a no-op rerun and check's header mode must not pay it."""
    code = ("import importlib, sys\n"
            f"for m in {ORCHESTRATOR!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_worker_side_does_not_import_the_ledger() -> None:
    code = ("import sys\nimport nnresume.worker.run\n"
            "print(sorted(m for m in sys.modules if m.startswith(('nnresume.ledger', 'nnresume.execution', "
            "'sqlalchemy'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_subpackage_is_installed() -> None:
    """A subpackage missing from pyproject.toml's list is absent from a (non-editable) `pip install .`, although the
    tests, which import the checkout, pass: `nnresume predict` once failed that way."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "nnresume").rglob("__init__.py")}
    assert found - listed == set()


MAX_LINES = 400


def test_no_module_is_over_400_lines_without_a_reason() -> None:
    """A module grows past what a reader holds in mind one change at a time; past MAX_LINES its docstring must say
    why it is one module, on a line starting with `Size:`."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "nnresume"
    too_long = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Size:") for line in doc.splitlines()):
            too_long.append(f"{path.relative_to(package.parent)}: {text.count(chr(10))} lines")
    assert too_long == []
