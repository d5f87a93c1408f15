"""Repair variants, each run through the project's own CLI (`dgrepair repair --in-process`) in a subprocess.

The lab never calls the engine directly: what it measures is what a user gets from the command line.
Variants whose method the installed CLI does not offer yet are reported as skipped, never faked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str  # method label in the score table, e.g. "dg_hard@1"
    method: str
    args: tuple[str, ...]
    matched: bool = False  # True: run at DG-Hard(scale 1)'s global rho via --target-rho


def variants(seed: int, methods: list[str] | None = None) -> list[Variant]:
    """The lab's grid; `matched` ones get `--target-rho` filled in from DG-Hard@1's summary."""
    grid = [Variant(f"dg_hard@{s:g}", "dg_hard", ("--scale", str(s))) for s in (0.5, 1.0, 2.0)]
    grid += [Variant(f"wise_ft@{a:g}", "wise_ft", ("--alpha", str(a))) for a in (0.25, 0.5, 0.75)]
    grid += [
        Variant("ties", "ties", ()),
        Variant("dare", "dare", ("--seed", str(seed))),
        Variant("fixed_rank", "fixed_rank", ()),
    ]
    # matched DARE is DARE-Linear: rescaled DARE keeps an expected rho >= 1, so the CLI refuses --target-rho
    grid += [Variant(f"{m}@rho", m, ("--seed", str(seed), "--no-dare-rescale") if m == "dare" else (), True)
             for m in ("wise_ft", "ties", "dare", "fixed_rank")]
    return [v for v in grid if methods is None or v.method in methods]


def dgrepair_exe() -> str:
    """The `dgrepair` console script of the running interpreter's environment."""
    local = Path(sys.executable).parent / "dgrepair"
    return str(local) if local.exists() else (shutil.which("dgrepair") or "dgrepair")


def cli_methods() -> set[str]:
    """Methods the installed CLI offers (`--method` choices); only dg_hard before the method registry."""
    out = subprocess.run([dgrepair_exe(), "repair", "--help"], capture_output=True, text=True, check=True).stdout
    if "--method" not in out:
        return {"dg_hard"}
    flat = " ".join(out.split())
    start = flat.index("--method {") + len("--method {")
    return set(flat[start : flat.index("}", start)].split(","))


def repair_command(base: Path, ft: Path, out: Path, v: Variant, target_rho: float | None, has_method: bool,
                   threads: int = 0) -> list:
    """`threads` > 0 caps the CLI's BLAS threads (the lab's `--threads`); 0 leaves the CLI's default."""
    cmd = [dgrepair_exe(), "repair", "--in-process", "--no-progress", "--base", str(base), "--ft", str(ft)]
    cmd += ["--out", str(out)] + (["--threads", str(threads)] if threads else [])
    if has_method:
        cmd += ["--method", v.method]
    cmd += list(v.args)
    if v.matched:
        if target_rho is None:
            raise ValueError(f"{v.name} needs DG-Hard@1's global rho")
        cmd += ["--target-rho", repr(target_rho)]
    return cmd


def run_repair(base: Path, ft: Path, out: Path, v: Variant, target_rho: float | None, has_method: bool,
               threads: int = 0) -> dict:
    """Run the CLI (resumes/skips a complete `out`) and return its summary.json."""
    summary = Path(out) / "dgrepair" / "summary.json"
    if not summary.is_file():
        cmd = repair_command(base, ft, out, v, target_rho, has_method, threads)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        (Path(out) / "lab_command.txt").write_text(" ".join(cmd) + "\n")
    return json.loads(summary.read_text())


def kept_ranks(out: Path) -> dict[str, dict]:
    """Per matrix class (q/k/v/o/gate/up/down/embed): matrices, mean kept rank, rank_total, mean rho and
    mean noise_energy_fraction, read from the run's manifest."""
    import pandas as pd

    df = pd.read_parquet(Path(out) / "dgrepair" / "manifest.parquet")
    df = df[df["rank_kept"].notna()]
    df = df.assign(cls=df["tensor"].map(_matrix_class))
    res = {}
    for cls, g in df.groupby("cls"):
        res[cls] = {
            "matrices": int(len(g)),
            "rank_kept_mean": float(g["rank_kept"].mean()),
            "rank_kept_min": int(g["rank_kept"].min()),
            "rank_kept_max": int(g["rank_kept"].max()),
            "rank_total": int(g["rank_total"].max()),
            "rho_mean": float(g["rho"].mean()) if "rho" in g else float("nan"),
            "noise_energy_fraction_mean": float(g["noise_energy_fraction"].mean())
            if "noise_energy_fraction" in g
            else float("nan"),
            "sigma_hat_mean": float(g["sigma_hat"].mean()) if "sigma_hat" in g else float("nan"),
            "delta_sq": float((g["frob_delta"] ** 2).sum()),
            "kept_sq": float((g["frob_kept"] ** 2).sum()),
        }
    return res


def _matrix_class(name: str) -> str:
    for key in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"):
        if key in name:
            return key
    return "other"
