"""``run_dir/status.json``: where a run stands, rewritten atomically by rank 0 as it goes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RunStatus:
    def __init__(self, run_dir: Path, enabled: bool, max_steps: int):
        self.path = Path(run_dir) / "status.json"
        self.enabled = enabled
        self.state = {"state": "starting", "step": 0, "max_steps": max_steps, "eta_s": None,
                      "last_checkpoint": None, "skipped_samples": 0, "nonfinite_steps": 0,
                      "starts": 0, "restarts": 0}  # fmt: skip
        if enabled and self.path.is_file():
            previous = json.loads(self.path.read_text())
            self.state["starts"] = previous.get("starts", 0)
        self.state["starts"] += 1
        # every start after the first resumed a run that stopped early (worker or driver died)
        self.state["restarts"] = self.state["starts"] - 1

    def update(self, **fields) -> None:
        self.state.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)
