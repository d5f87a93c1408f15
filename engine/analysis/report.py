"""`dgrepair report OUT`: a Markdown (or HTML) report of a finished run, with PNG figures.

Reads OUT/dgrepair/summary.json and the manifest; writes OUT/dgrepair/report/ with report.md (or
report.html), report.json (the same numbers at full precision) and the figures: the App. I.1
noise table per layer class, kept-rank histograms per class, ρ per layer and, for chosen tensors,
the Fig. 4(a) spectrum (singular values, τ, MP edge) recomputed from the run's inputs. Figures use
matplotlib's object API on the Agg canvas: no display, no pyplot global state.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..output import manifest
from ..output.paths import report_dir, summary_file
from ..plan.kinds import Kind
from . import report_stats
from .report_spectra import Spectrum, recompute

DPI = 100
SPECTRUM_SIZE = (8.0, 4.5)  # inches: 800 x 450 px
RHO_SIZE = (8.0, 4.5)
HIST_CELL = (4.0, 3.0)  # per class panel: 400 x 300 px
HIST_COLUMNS = 3
Block = tuple[Any, ...]


def load_run(out: Path) -> tuple[dict[str, Any], list[manifest.ManifestRow]]:
    """summary.json and the spectral manifest rows of a finished run."""
    path = summary_file(out)
    if not path.is_file():
        raise InputError(f"{out}: no dgrepair/summary.json, so this is not a finished dgrepair run (a run writes it "
                         "last); finish it by re-running the same repair command, then render the report.")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); re-run the repair command to rewrite it.") from None
    rows = report_stats.spectral_rows(manifest.read_rows(out), summary.get("plan_id"))
    return summary, rows


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def rank_bins(values: list[int]) -> tuple[range, tuple[float, float]]:
    """Integer bins and an x range at least 5 ranks wide, so one matrix (or one rank) is a readable bar
    centred on its value rather than a full-width block."""
    lo, hi = min(values), max(values)
    pad = max(0.0, (5 - (hi - lo + 1)) / 2)
    return range(lo, hi + 2), (lo - 0.5 - pad, hi + 0.5 + pad)


def plot_kept_ranks(ranks: dict[str, list[int]], path: Path) -> tuple[int, int]:
    """One histogram panel per class; returns the image size in pixels."""
    ncols = min(HIST_COLUMNS, max(len(ranks), 1))
    nrows = max(math.ceil(len(ranks) / ncols), 1)
    fig = _figure((HIST_CELL[0] * ncols, HIST_CELL[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (cls, values) in zip(axes.flat, ranks.items(), strict=False):  # spare panels stay empty
        bins, xlim = rank_bins(values)
        ax.hist(values, bins=bins, align="left", color="tab:blue", edgecolor="white", rwidth=0.8)
        ax.set_xlim(*xlim)
        ax.set_title(f"{cls} ({len(values)} matri{'x' if len(values) == 1 else 'ces'})", fontsize=9)
        ax.set_xlabel("kept rank")
        ax.set_ylabel("matrices")
        _integer_axis(ax.xaxis)
        _integer_axis(ax.yaxis)
    for ax in list(axes.flat)[len(ranks):]:
        ax.set_axis_off()
    fig.savefig(path, format="png")
    return int(HIST_CELL[0] * ncols * DPI), int(HIST_CELL[1] * nrows * DPI)


def plot_rho(series: dict[str, dict[int, float]], path: Path) -> tuple[int, int]:
    fig = _figure(RHO_SIZE)
    ax = fig.subplots()
    for name, values in series.items():
        ax.plot(list(values), list(values.values()), marker="o", label=name, linewidth=2 if name == "all" else 1)
    ax.set_xlabel("layer")
    _integer_axis(ax.xaxis)
    ax.set_ylabel("ρ = ‖Δ*‖_F / ‖Δ‖_F")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Frobenius retention per layer")
    fig.savefig(path, format="png")
    return int(RHO_SIZE[0] * DPI), int(RHO_SIZE[1] * DPI)


def plot_spectrum(sp: Spectrum, tau: float, mp_edge: float, path: Path) -> tuple[int, int]:
    """Fig. 4(a): the singular values of Δ, the DG-Hard threshold τ and the Marchenko–Pastur edge."""
    fig = _figure(SPECTRUM_SIZE)
    ax = fig.subplots()
    idx = list(range(1, sp.s.size + 1))
    floor = max(float(sp.s.max()) * 1e-12, 1e-300)
    values = [max(float(v), floor) for v in sp.s]
    kept = [i for i, v in zip(idx, sp.s, strict=True) if v > tau]
    ax.semilogy(idx, values, ".", color="tab:gray", markersize=3, label="singular values")
    if kept:
        ax.semilogy(kept, values[:len(kept)], "o", color="tab:red", markersize=4, label=f"kept ({len(kept)})")
    if tau > 0:
        ax.axhline(tau, color="tab:red", linestyle="--", label=f"τ = {tau:.4g}")
    if mp_edge > 0:
        ax.axhline(mp_edge, color="tab:blue", linestyle=":", label=f"MP edge = {mp_edge:.4g}")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i")
    ax.set_title(f"{sp.label} {sp.shape[0]}×{sp.shape[1]}", fontsize=9)
    ax.legend()
    fig.savefig(path, format="png")
    return int(SPECTRUM_SIZE[0] * DPI), int(SPECTRUM_SIZE[1] * DPI)


def _default_tensor(rows: list[manifest.ManifestRow]) -> list[str]:
    """Without --tensors: the 2-D matrix with the largest ‖Δ‖_F."""
    plain = [r for r in rows if r.kind == Kind.SVD and (r.frob_delta or 0) > 0]
    if not plain:
        return []
    return ["^" + re.escape(max(plain, key=lambda r: r.frob_delta or 0.0).tensor) + "$"]


def build_report(out: Path, fmt: str = "md", tensors: list[str] | None = None, max_spectra: int = 8) -> Path:
    """Render the report; returns the path of report.md / report.html."""
    if fmt not in ("md", "html"):
        raise InputError(f"--format must be md or html, got {fmt!r}.")
    out = Path(out)
    summary, rows = load_run(out)
    folder = report_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    classes = report_stats.class_table(rows)
    blocks: list[Block] = [("h", 1, "dgrepair report")]
    cfg = summary.get("config", {})
    totals = summary.get("totals", {})
    inputs = summary.get("inputs", {})
    blocks.append(("p", f"Run `{summary.get('plan_id')}`: base `{_where(inputs, 'base', cfg)}`, fine-tune "
                        f"`{_where(inputs, 'ft', cfg)}`, output `{out.resolve()}`; {len(rows)} matrices with spectra, "
                        "global ρ "
                        f"{totals.get('global_rho', float('nan')):.4f}; scale {cfg.get('scale')}, kernel "
                        f"{cfg.get('kernel')}, finished {summary.get('finished_utc')}."))
    blocks += _class_blocks(classes)
    figures: dict[str, list[int]] = {}
    ranks = report_stats.kept_ranks_by_class(rows)
    if ranks:
        figures["kept_ranks.png"] = list(plot_kept_ranks(ranks, folder / "kept_ranks.png"))
        blocks += [("h", 2, "Kept rank per layer class"), ("img", "kept_ranks.png", "kept-rank histograms")]
    series = {"all": report_stats.rho_by_layer(rows)}
    for group in report_stats.class_groups(rows):
        series[group] = report_stats.rho_by_layer(rows, group)
    blocks.append(("h", 2, "Frobenius retention ρ per layer"))
    if series["all"]:
        figures["rho_per_layer.png"] = list(plot_rho(series, folder / "rho_per_layer.png"))
        blocks.append(("img", "rho_per_layer.png", "rho per layer"))
        blocks.append(("table", ["layer", *series], [[str(i), *(_num(series[g].get(i)) for g in series)]
                                                     for i in series["all"]]))
    else:
        blocks.append(("p", "No repaired tensor carries a layer index."))
    spectra_json, spectrum_blocks = _spectra(out, summary, rows, tensors, max_spectra, folder, figures)
    blocks += spectrum_blocks
    data = {"plan_id": summary.get("plan_id"), "classes": [asdict(c) for c in classes],
            "rho_by_layer": {k: {str(i): v for i, v in s.items()} for k, s in series.items()},
            "kept_ranks": ranks, "spectra": spectra_json, "figures": figures}
    (folder / "report.json").write_text(json.dumps(data, indent=1))
    target = folder / f"report.{fmt}"
    target.write_text(render_markdown(blocks) if fmt == "md" else render_html(blocks))
    return target


def _where(inputs: dict[str, Any], role: str, cfg: dict[str, Any]) -> str:
    """An input as one absolute path (the resolved folder the run read), the Hub id kept beside it."""
    root = (inputs.get(role) or {}).get("root")
    given = cfg.get(role)
    if root is None:
        return str(given)
    return root if given is None or Path(str(given)).expanduser().resolve() == Path(root) else f"{given} → {root}"


def _count(x: float) -> str:
    """A mean of integers: shown as an integer when it is one (p = 576, not 576.0)."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _class_blocks(classes: list[report_stats.ClassStats]) -> list[Block]:
    rows = [[c.layer_class, str(c.matrices), _num(c.mean_noise), _num(c.norm_share), _num(c.noise_mass),
             f"{_count(c.mean_rank_kept)} / {_count(c.mean_rank_total)}", _num(c.rho), _num(c.max_requant_error)]
            for c in classes]
    return [("h", 2, "Noise by layer class (paper App. I.1)"),
            ("p", "Mean noise-energy fraction: share of Σs² at or below the Marchenko–Pastur edge, averaged over "
                  "the class's matrices with Δ ≠ 0. Norm share: the class's Σ‖Δ‖²_F over the run's. Noise mass: "
                  "their product. ρ: sqrt(Σ‖Δ*‖² / Σ‖Δ‖²) over the class. Requant err: the largest "
                  "‖written − W*‖_F / ‖W*‖_F of the class's quantized (FP8, MXFP4, packed INT) or BF16-converted "
                  "weights; empty for dense ones."),
            ("table", ["class", "matrices", "mean noise", "norm share", "noise mass", "kept / p (mean)", "ρ",
                       "requant err (max)"], rows)]


def _spectra(out: Path, summary: dict[str, Any], rows: list[manifest.ManifestRow], tensors: list[str] | None,
             limit: int, folder: Path, figures: dict[str, list[int]]) -> tuple[list[dict], list[Block]]:
    blocks: list[Block] = [("h", 2, "Spectra (paper Fig. 4(a))")]
    patterns = tensors or _default_tensor(rows)
    if not patterns:
        return [], [*blocks, ("p", "No 2-D matrix with Δ ≠ 0 to plot.")]
    try:
        spectra, matched = recompute(summary, patterns, limit)
    except InputError as exc:
        if tensors:
            raise
        return [], [*blocks, ("p", f"Spectrum not plotted: {exc}")]
    latest = manifest.latest_by_key(rows)
    if matched > len(spectra):
        blocks.append(("p", f"{matched} matrices match; the first {len(spectra)} are plotted (--max-spectra)."))
    table, records = [], []
    for i, sp in enumerate(spectra):
        run = latest.get((sp.tensor, sp.expert, sp.part))
        tau = run.tau if run is not None and run.tau is not None else sp.stats.tau
        edge = run.mp_edge if run is not None and run.mp_edge is not None else sp.stats.mp_edge
        name = f"spectrum_{i:02d}.png"
        figures[name] = list(plot_spectrum(sp, tau, edge, folder / name))
        blocks.append(("img", name, f"spectrum of {sp.label}"))
        kept_run = run.rank_kept if run is not None else None
        table.append([sp.label, f"{sp.shape[0]}×{sp.shape[1]}", f"{sp.stats.s_max:.4g}", f"{tau:.4g}",
                      f"{sp.stats.tau:.4g}", f"{edge:.4g}", str(kept_run), str(sp.stats.rank_kept)])
        records.append({"tensor": sp.tensor, "expert": sp.expert, "part": sp.part, "shape": list(sp.shape),
                        "singular_values": sp.s.tolist(), "tau_run": tau, "mp_edge_run": edge,
                        "tau_recomputed": sp.stats.tau, "mp_edge_recomputed": sp.stats.mp_edge,
                        "rank_kept_run": kept_run, "rank_kept_recomputed": sp.stats.rank_kept, "figure": name})
    blocks.append(("table", ["matrix", "shape", "s_max", "τ (run)", "τ (recomputed)", "MP edge", "kept (run)",
                             "kept (recomputed)"], table))
    return records, blocks


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif b[0] == "table":
            cells = [[str(c).replace("|", "\\|") for c in row] for row in [b[1], *b[2]]]
            lines.append("| " + " | ".join(cells[0]) + " |")
            lines.append("|" + "|".join("---" for _ in cells[0]) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
            lines.append("")
    return "\n".join(lines)


def render_html(blocks: list[Block]) -> str:
    esc = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>dgrepair report</title>",
             "<style>body{font-family:sans-serif;max-width:72em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>",
             "</head><body>"]
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{esc(b[1])}</p>")
        elif b[0] == "img":
            parts.append(f"<p><img src='{esc(b[1])}' alt='{esc(b[2])}'></p>")
        elif b[0] == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
