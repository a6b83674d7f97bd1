"""The short random kill campaign: real SIGKILLs to the orchestrator, a worker or the whole process group at random
moments; nothing corrupt is ever accepted, nothing is lost, the result equals an uninterrupted run. The long campaign
(scripts/kill_campaign.py, results in RELIABILITY.md) runs the same code with hundreds of kills."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_short_kill_campaign(tmp_path: Path) -> None:
    from kill_campaign import run_campaign

    result = run_campaign(kills=5, workdir=tmp_path, seed=7, workers=2, cases=5, nnunet_reference=False,
                          log=lambda *_: None)
    assert result["kills"] == 5
    assert result["corrupt_accepted"] == 0
    assert result["cases_lost"] == 0
    assert result["integrity_failures"] == 0
    assert result["identical"] is True
    assert result["unvouched_files"] == 0
    assert result["orphaned_processes"] == 0
