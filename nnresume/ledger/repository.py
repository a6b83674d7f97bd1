"""Named ledger operations. Each is one transaction and returns plain dataclasses, never ORM objects.

Only the orchestrator process calls the writing operations. The one that makes an output real is `output_done`:
its commit is the moment a case's files in a configuration folder become trusted.

`Ledger` is made of one class per area, each in its module: the machinery they share (core.py: sessions, writes
grouped into one commit), what each run did (history.py), where each case stands (state.py) and what `status` reads
(queries.py). The dataclasses they return (records.py) are importable from here too.
"""
from __future__ import annotations

from .history import RunHistory
from .queries import StatusQueries
from .records import (
    ArtifactRecord,
    AttemptRecord,
    CaseRecord,
    ConfigurationRecord,
    FindingRecord,
    FingerprintRecord,
    MemorySampleRecord,
    OutputRecord,
    RunRecord,
    StatusRows,
)
from .state import CaseState

__all__ = ["ArtifactRecord", "AttemptRecord", "CaseRecord", "ConfigurationRecord", "FindingRecord",
           "FingerprintRecord", "Ledger", "MemorySampleRecord", "OutputRecord", "RunRecord", "StatusRows"]


class Ledger(RunHistory, CaseState, StatusQueries):
    """The ledger of one dataset or prediction folder: `Ledger.open(path)`, then its named operations."""
