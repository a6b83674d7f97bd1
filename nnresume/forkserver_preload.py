"""Imported by the forkserver only, before it serves: ignore SIGTERM, then import the worker (and nnunetv2).

A batch scheduler's time limit sends SIGTERM to every process of the job. The orchestrator turns it into an orderly
stop with a grace period for running cases; if the forkserver died of it instead, every running case would die with it
(workers die with their parent). SIGINT the forkserver already ignores. The orchestrator never imports this module.
"""
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)

from . import worker  # noqa: E402,F401  (the preload: nnunetv2 is imported once, here)
