"""`nnresume preprocess`: every dataset it names in turn, through one pool (local, or a Dask cluster's), with SIGINT
and SIGTERM turned into an orderly stop; each dataset's run is pipeline.py's.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ..config import Paths, PreprocessSettings
from ..errors import EXIT_OK


def preprocess_datasets(settings: PreprocessSettings, paths: Paths, scheduler_address: Optional[str] = None,
                        scheduler_file: Optional[str] = None) -> int:
    """Every dataset of `settings` in turn, with one pool (local, or a Dask cluster's) and signals turned into an
    orderly stop; returns the exit code (the worst of the datasets', or the signal's)."""
    # The forkserver's ~3 s import of nnunetv2 overlaps this process's own imports (the ledger's SQLAlchemy, the
    # pipeline: imported here, not at the top), the lock, the ledger and the scan: it starts first. One pool serves
    # all datasets.
    from ..execution.pools.local import LocalPool

    os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = paths.raw, paths.preprocessed
    pool: Any
    if scheduler_address or scheduler_file:
        from ..execution.pools.dask import DaskPool

        pool = DaskPool(address=scheduler_address, scheduler_file=scheduler_file)
        settings = pool.settings_for(settings)
    else:
        pool = LocalPool()
    pool.warm_up()

    from ..execution.runner import stop_on_signals
    from ..session import log_summary
    from .pipeline import run_dataset

    exit_code = EXIT_OK
    with stop_on_signals() as stop:
        try:
            for d in settings.datasets:
                outcome = run_dataset(settings, paths, d, stop, pool)
                log_summary(outcome)
                exit_code = max(exit_code, outcome.exit_code) if outcome.exit_code < 100 else outcome.exit_code
                if stop:
                    break
        finally:
            pool.shutdown()
    return exit_code
