"""The orchestrator's side of prediction's device process: starting it, and starting it again.

The process (worker/inference/device.py) is a companion of the local pool: forked from the same forkserver as the
workers (so nnunetv2 and torch are already imported), its memory counted as the run's own. It loads the network once and
runs every case's sliding window; the workers reach it through a `DeviceLink`: an abstract Unix socket (nothing on disk,
no path-length limit) named at random for this run, and a random key without which it accepts no connection.

If it dies (the OOM killer, a crash), the pool tells `DeviceOwner` from its poll and another is started at once; the
worker it was serving sends its case again (worker/inference/case.py: `infer`). If it cannot load the model, it says why
in the info file and exits: every waiting case fails with that message, and it is not started again. Dying `LOAD_DEATHS`
times before it is ready counts as the same: the message says how it died.
"""
from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any, Optional

from ..execution.pools.base import describe_signal
from ..execution.pools.local import LocalPool
from ..tasks import DeviceLink, ModelSpec

log = logging.getLogger(__name__)

LOAD_DEATHS = 3  # deaths before the model is loaded after which the process is not started again


def _how(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {describe_signal(-exitcode)}"
    return f"exited with code {exitcode}"


class DeviceOwner:
    def __init__(self, pool: LocalPool, model: ModelSpec, staging: Path) -> None:
        self.pool, self.model = pool, model
        self.link = DeviceLink(address=f"\0nnresume-device-{secrets.token_hex(12)}",
                               authkey=secrets.token_bytes(32), info=str(staging / "device.json"))
        self.process: Any = None
        self.restarts = 0
        self._load_deaths = 0

    def start(self) -> None:
        """Starts the process; its info file is in this run's own staging folder, so none is there yet."""
        self.process = self.pool.start_companion("device", (self.link, self.model), on_exit=self._exited)
        log.debug("device process started (pid %s)", self.process.pid)

    def _info(self) -> dict[str, Any]:
        try:
            with open(self.link.info) as f:
                info: dict[str, Any] = json.load(f)
                return info
        except (OSError, ValueError):
            return {}

    def _exited(self, process: Any) -> None:
        """Called by the pool when the process ended by itself."""
        self.process = None
        info = self._info()
        if info.get("pid") == process.pid and "error" in info:
            log.error("the model could not be loaded: %s", info["error"])
            return
        how = _how(process.exitcode)
        if info.get("pid") != process.pid:  # it died before it was ready
            self._load_deaths += 1
            if self._load_deaths >= LOAD_DEATHS:
                message = (f"the device process {how} while loading the model, {self._load_deaths} times; "
                           f"not started again")
                log.error("%s", message)
                self._write_error(message)
                return
        log.warning("the device process (pid %s) %s; starting it again (the case it was predicting is sent again)",
                    process.pid, how)
        self.restarts += 1
        self.start()

    def _write_error(self, message: str) -> None:
        tmp = Path(f"{self.link.info}.tmp")
        tmp.write_text(json.dumps({"pid": None, "error": message}))
        tmp.replace(self.link.info)

    def close(self) -> None:
        if self.process is not None:
            self.pool.stop_companion(self.process)
            self.process = None
