"""Recompute the spectra of chosen tensors of a finished run, for the Fig. 4(a) plots of the report.

The manifest keeps scalar statistics only, so the singular values are recomputed from the run's
own inputs (the base and fine-tune recorded in summary.json), with the same plan, the same
reshaping rules (`layouts.to_matrices`, FP8 dequantisation) and the project's kernels
(`kernels.spectral.singular_values`, `threshold_spectrum`). The plan id must still match the run's,
so a changed checkpoint is refused instead of plotted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...kernels.methods import SpectralMethod, build_method
from ...kernels.spectral import singular_values
from ...kernels.threshold import SpectralRule, SpectralStats, ThresholdParams, threshold_spectrum
from ..config import RepairConfig
from ..errors import InputError
from ..plan.kinds import REPAIR_KINDS, SCALE_KINDS
from ..plan.layouts import row_identity
from ..plan.model import PlanEntry
from ..run.inputs import Inputs, entry_job, load_inputs
from ..run.repair_step import delta_matrices


@dataclass(frozen=True)
class Spectrum:
    """One matrix's singular values and the threshold statistics recomputed from them."""

    tensor: str
    expert: int | None
    part: str | None
    shape: tuple[int, int]
    s: np.ndarray  # descending, float64
    stats: SpectralStats

    @property
    def label(self) -> str:
        extra = "" if self.expert is None else f" expert {self.expert}"
        return self.tensor + extra + ("" if self.part is None else f" ({self.part})")


def open_run_inputs(summary: dict) -> Inputs:
    """The run's plan, rebuilt from summary.json's config; refused when the inputs have changed."""
    try:
        cfg = RepairConfig.from_mapping(dict(summary["config"]), "summary.json config")
    except KeyError:
        raise InputError("summary.json has no 'config'; it was not written by this version of dgrepair.") from None
    inp = load_inputs(cfg, need_out=False)
    if inp.plan.plan_id != summary.get("plan_id"):
        raise InputError(f"the checkpoints recorded in summary.json ({cfg.inputs.base}, {cfg.inputs.ft}) no "
                         f"longer match the run (plan id {inp.plan.plan_id}, the run's {summary.get('plan_id')}); "
                         "spectra cannot be recomputed. Render the report without --tensors, or point it at the "
                         "original inputs.")
    return inp


def select_entries(inp: Inputs, patterns: list[str]) -> list[PlanEntry]:
    """Repaired entries whose name matches any regex (searched, like --include)."""
    try:
        regexes = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise InputError(f"--tensors: invalid regular expression ({exc}).") from None
    chosen = [e for e in inp.plan.entries if e.kind in REPAIR_KINDS and any(r.search(e.name) for r in regexes)]
    if not chosen:
        raise InputError(f"--tensors {' '.join(patterns)}: no repaired tensor matches; the run repaired "
                         f"{sum(e.kind in REPAIR_KINDS for e in inp.plan.entries)} tensors (see the manifest).")
    return chosen


def spectral_rule(inp: Inputs, summary: dict | None) -> SpectralRule:
    """The run's own rule (its method, with any --target-rho knob as solved); DG-Hard's τ for reference
    when the method is element-wise."""
    recorded = (summary or {}).get("method")
    method = build_method(recorded["name"], recorded["params"]) if recorded else inp.cfg.repair_method()
    if isinstance(method, SpectralMethod):
        return method.rule()
    return ThresholdParams(median=getattr(method, "median", "lower"))


def entry_spectra(inp: Inputs, entry: PlanEntry, limit: int, summary: dict | None = None) -> list[Spectrum]:
    """Spectra of the first `limit` matrices of an entry (stacks hold one per expert and half)."""
    if entry.matrix_shape is None:
        raise InputError(f"tensor {entry.name!r} is not repaired as matrices ({entry.kind}); it has no spectrum.")
    aux = [entry_job(inp, e) for e in inp.plan.entries if e.companion == entry.name and e.kind in SCALE_KINDS]
    mats, kind = delta_matrices(entry_job(inp, entry), aux)
    params = spectral_rule(inp, summary)
    out = []
    for i in range(min(limit, mats.shape[0])):
        m = mats[i].contiguous()
        s = singular_values(m, inp.cfg.execution.kernel)
        expert, part = row_identity(kind, i)
        out.append(Spectrum(entry.name, expert, part, (m.shape[0], m.shape[1]), s,
                            threshold_spectrum(s, m.shape[0], m.shape[1], params)))
    return out


def recompute(summary: dict, patterns: list[str], limit: int) -> tuple[list[Spectrum], int]:
    """Spectra of the matrices of the matching tensors, at most `limit`; also how many matched."""
    inp = open_run_inputs(summary)
    entries = select_entries(inp, patterns)
    total = sum(e.n_matrices for e in entries)
    spectra: list[Spectrum] = []
    for e in entries:
        if len(spectra) >= limit:
            break
        spectra += entry_spectra(inp, e, limit - len(spectra), summary)
    return spectra, total
