"""Fine-tune several seeds one after another (a background companion of `run.py --wait`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_data import TASKS  # noqa: E402
from lab_finetune import finetune  # noqa: E402
from run import trajectory_dir  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", choices=sorted(TASKS), default="add")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[15, 30])
    p.add_argument("--workdir", type=Path, default=Path("bench/_work/lab"))
    a = p.parse_args()
    for s in a.seeds:
        finetune(a.workdir / "base", trajectory_dir(a.workdir, a.task, a.lr, s), s, a.steps, a.lr, task=a.task)
