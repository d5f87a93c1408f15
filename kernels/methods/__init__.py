"""The method registry behind `--method`: one module per method, each a frozen dataclass whose
fields are its parameters (and the RepairConfig fields of the same names)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..spectral import Factors, repair_batch
from ..threshold import SpectralStats
from .base import ElementwiseMethod, Method, SpectralMethod
from .dare import Dare
from .dg_hard import DGHard
from .fixed_rank import FixedRank
from .mp_edge import MPEdge
from .optimal_shrink import OptimalShrink
from .ties import Ties
from .wise_ft import WiseFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (DGHard, WiseFT, Ties, Dare, FixedRank, MPEdge,
                                                         OptimalShrink)}


def method_fields(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(METHODS[name]))


def build_method(name: str, values: dict[str, Any]) -> Method:
    """The method `name` with its parameters taken from `values` (unrelated keys are ignored)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(**{f: values[f] for f in method_fields(name) if f in values})


def apply_method(method: Method, delta: torch.Tensor, keys: list[str], backend: str = "auto",
                 device: str | None = None, threads: int | None = None,
                 factors: Factors | None = None, out_dtype: str | None = None, fp64_rate: str = "auto"
                 ) -> tuple[torch.Tensor, list[SpectralStats]]:
    """Δ* and per-matrix stats for a float32 batch (B, m, n); `keys` name the B matrices. `out_dtype`
    and `fp64_rate` feed the spectral kernels' precision policy."""
    if isinstance(method, SpectralMethod):
        return repair_batch(delta, method.rule(), backend, device=device, threads=threads, factors=factors,
                            out_dtype=out_dtype, fp64_rate=fp64_rate)
    if not isinstance(method, ElementwiseMethod):
        raise TypeError(f"method {method.name} is neither spectral nor element-wise")
    if factors is not None:
        raise ValueError(f"method {method.name} changes Δ entry by entry; its result has no low-rank factors")
    return method.apply(delta, keys)


__all__ = ["METHODS", "Method", "SpectralMethod", "ElementwiseMethod", "build_method", "apply_method",
           "method_fields"]
