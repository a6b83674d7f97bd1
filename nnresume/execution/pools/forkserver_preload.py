"""Imported by the forkserver only, before it serves: ignore SIGTERM, stand in for the orchestrator's main script,
import the worker (and nnunetv2) and the modules the pool names in NNRESUME_FORKSERVER_PRELOAD, then freeze the
garbage collector's view of them.

SIGTERM: a batch scheduler's time limit sends it to every process of the job. The orchestrator turns it into an orderly
stop with a grace period for running cases; if the forkserver died of it instead, every running case would die with it
(workers die with their parent). SIGINT the forkserver already ignores.

The main script: when the orchestrator runs as a script (the `nnresume` console command), multiprocessing re-runs that
script in every child it starts, unless the child's `__main__` already has the script's path. On Python 3.11 the
forkserver's own provision for this (preloading `__main__`) never receives the path, so each worker would import the
CLI, click and SQLAlchemy again: ~0.45 s per case, measured. The orchestrator passes its script's path in
NNRESUME_PARENT_MAIN, and a stand-in module with that path is registered here, once, for all workers.

The orchestrator never imports this module.
"""
import gc
import importlib
import os
import signal
import sys
import types

signal.signal(signal.SIGTERM, signal.SIG_IGN)

_main = os.environ.get("NNRESUME_PARENT_MAIN")
if _main:
    _stand_in = types.ModuleType("__mp_main__")
    _stand_in.__file__ = _main
    sys.modules["__main__"] = sys.modules["__mp_main__"] = _stand_in

from ...worker import run  # noqa: E402,F401  (the preload: nnunetv2 is imported once, here)

for _name in filter(None, os.environ.get("NNRESUME_FORKSERVER_PRELOAD", "").split(",")):
    importlib.import_module(_name)

# Every child forked from here shares these pages until it writes to them. The cyclic garbage collector writes to
# every object it examines, so a child's first full collection would make its own copy of most of the pages nnunetv2
# and torch filled; frozen objects are never examined again.
gc.freeze()
