"""The training-run scaffold shared by pretrain, sft and grpo: the metrics log (more to come).

    from nanoseek.train.run import MetricsLog
    log = MetricsLog(out / "metrics.jsonl", resume_step)   # JSONL, one line per step
"""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint


class MetricsLog:
    """OUT/metrics.jsonl, one line per step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        checkpoint.truncate_log(path, resume_step)
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
