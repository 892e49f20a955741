"""Experiment tracking: a local metrics.jsonl always, wandb when wandb.mode is not `disabled`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class Tracker:
    """Appends one JSON line per `log` call to `run_dir/metrics.jsonl` and mirrors it to wandb.

    Only the main process should create one (pass `enabled=False` elsewhere: every call becomes a no-op).
    wandb is imported only when used; gradients and parameters are never watched.
    """

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str, run_name: str,
                 config: dict[str, Any], job_type: str, enabled: bool = True, resume_id: str = ""):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb  # heavy import: only when tracking is on

        # silent: wandb's own banner and summary are ~40 lines per run; one line of ours says where it went.
        self.run = wandb.init(
            mode=mode, project=project, entity=entity or None, name=run_name or None, dir=str(run_dir),
            config=config, job_type=job_type, id=resume_id or None, resume="allow" if resume_id else None,
            settings=wandb.Settings(silent=True),
        )
        self.announcement = (f"wandb: {mode} run {self.run.id} in {self.run.dir}"
                             + (f"; upload it with `wandb sync {Path(self.run.dir).parent}`" if mode == "offline" else ""))

    @property
    def run_id(self) -> str:
        return self.run.id if self.run is not None else ""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(record, allow_nan=True) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            print(self.announcement)
