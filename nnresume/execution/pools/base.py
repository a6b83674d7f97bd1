"""The interface between the runner and whatever runs tasks: the events a pool reports and the methods it offers.

The runner (execution/runner.py) knows nothing of processes: it submits tasks, polls for events, stops a task, and
reads the memory of what runs. `local.py` implements this with forked worker processes on this machine;
`tests/test_runner.py` drives the runner with a scripted pool that forks nothing. A back end that runs tasks
elsewhere implements the same methods.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from ...tasks import Death, Message
from ..memory import Readings


@dataclass
class Received:
    """A message from a running task: a result to commit, or its last word (TaskFinished, TaskFailed)."""

    task_id: str
    message: Message


@dataclass
class Ended:
    """The task's process is gone. `death` is None when it said it finished (or failed cleanly) first."""

    task_id: str
    death: Optional[Death]


@dataclass
class Started:
    """A task given with `enqueue` began: its worker finished the task before it."""

    task_id: str


Event = Union[Received, Ended, Started]


class Pool(Protocol):
    on_this_machine: bool  # tasks run here: this machine's memory limit bounds them
    queue_depth: int  # tasks per worker the pool can hold queued (`enqueue`); 0: none

    def enqueue(self, task: Any, estimate: int) -> None:
        """Holds `task` until a running task ends, then starts it at once in the freed worker (a Started event says
        when). For small tasks this saves the round trip through the runner's loop. `kill` of a queued task
        removes it from the queue; an Ended event with `killed_by_us` follows."""

    def warm_up(self) -> None:
        """Prepares to run tasks (starts what takes long to start) without waiting for it."""

    def submit(self, task: Any, estimate: int) -> None:
        """Starts `task`; `estimate` is its expected peak memory in bytes, for back ends that reserve memory."""

    def poll(self, timeout: float) -> list[Event]:
        """Events since the last poll, waiting up to `timeout` seconds for the first."""

    def kill(self, task_id: str) -> None:
        """Stops a running task now; an Ended event with `killed_by_us` follows."""

    def readings(self) -> Readings:
        """Memory of everything this pool runs, each page counted once, with each running task's own part."""

    def private_peak(self, task_id: str, peak_rss: int) -> int:
        """A task's reported peak RSS less the pages it shares with the pool's own processes."""

    def stop_all(self) -> None:
        """Kills and reaps every running task; the pool stays usable."""

    def shutdown(self) -> None:
        """Stops everything the pool started."""


def describe_signal(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
