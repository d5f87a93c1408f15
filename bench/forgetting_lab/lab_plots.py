"""The lab report's two figures, drawn from the same results as its tables (nothing typed by hand);
what each shows is its caption in CAPTIONS. The damaged skill is plotted as the change from each seed's
own fine-tune because the seeds' fine-tunes differ by more than the methods do.

matplotlib's object API on the Agg canvas (as `dgrepair report`): no display, no pyplot state.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from lab_report import by_task_length, noise_residual

DAMAGED = "geography"  # the held-out skill both tasks damage (lab README)
DPI = 100
PANEL = (3.6, 3.0)
MARKERS = "osD^v<>Px*"
CAPTIONS = {
    "score_vs_rho": "Damaged held-out skill (geography) against each variant's global ρ, one point per seed, as "
                    "the change from that seed's fine-tune; dotted: the straight line from base (ρ 0) to the "
                    "fine-tune (ρ 1, change 0).",
    "noise_residual": "DG-Hard@1's discarded energy ‖Δ‖² − ‖Δ*‖² and its share 1 − ρ² against the fine-tune "
                      "length (mean over seeds, min–max bars).",
}


def rho_points(cells: list[dict], benchmark: str = DAMAGED) -> dict[tuple[str, int], dict[str, list[tuple]]]:
    """Per (task, steps): method -> [(ρ, score − the seed's ft score, seed)] for every evaluated variant;
    base at ρ 0, ft at ρ 1 (and 0 by construction)."""
    scored = sorted((c for c in cells if not c.get("repair_only") and "evals" in c), key=lambda c: c["seed"])
    out: dict[tuple[str, int], dict[str, list[tuple]]] = {}
    for key, group in by_task_length(scored).items():
        panel = out[key] = {}
        for c in group:
            ft = c["evals"]["ft"][benchmark]["score"]
            for method, ev in c["evals"].items():
                rho = {"base": 0.0, "ft": 1.0}.get(method, c["repairs"].get(method, {}).get("global_rho"))
                if rho is not None:
                    panel.setdefault(method, []).append((rho, ev[benchmark]["score"] - ft, c["seed"]))
    return out


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def plot_score_vs_rho(cells: list[dict], path: Path, benchmark: str = DAMAGED) -> tuple[int, int] | None:
    """One panel per (task, length); returns the image size in pixels, or None with nothing to plot."""
    panels = rho_points(cells, benchmark)
    if not panels:
        return None
    methods = list(dict.fromkeys(m for p in panels.values() for m in p))
    size = (PANEL[0] * len(panels), PANEL[1] + 0.8)
    fig = _figure(size)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((task, steps), series) in zip(axes, panels.items(), strict=True):
        if "base" in series:
            b = statistics.mean(y for _, y, _ in series["base"])
            ax.plot([0, 1], [b, 0], color="tab:gray", linestyle=":", linewidth=1)
        ax.axhline(0, color="tab:gray", linewidth=0.5)
        for i, m in enumerate(methods):
            pts = series.get(m, [])
            if pts:
                ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=MARKERS[i % len(MARKERS)],
                           s=22, label=m, color=f"C{i % 10}")
        ax.set_title(f"{task}, {steps} steps", fontsize=9)
        ax.set_xlabel("global ρ (Frobenius retention of Δ)")
        ax.set_ylabel(f"{benchmark}: score − the seed's fine-tune")
        ax.set_xlim(-0.05, 1.1)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 7), fontsize=8)
    fig.savefig(path, format="png")
    return int(size[0] * DPI), int(size[1] * DPI)


def plot_noise_residual(cells: list[dict], path: Path) -> tuple[int, int] | None:
    """Discarded energy and its share against steps (log axis), one line per task."""
    rows = noise_residual(cells)
    if not rows:
        return None
    size = (2 * PANEL[0], PANEL[1])
    fig = _figure(size)
    left, right = fig.subplots(1, 2)
    for i, task in enumerate(dict.fromkeys(r.task for r in rows)):
        mine = [r for r in rows if r.task == task]
        steps = [r.steps for r in mine]
        for ax, field in ((left, "discarded"), (right, "share")):
            vals = [getattr(r, field) for r in mine]
            mean = [statistics.mean(v) for v in vals]
            err = [[m - min(v) for m, v in zip(mean, vals, strict=True)],
                   [max(v) - m for m, v in zip(mean, vals, strict=True)]]
            ax.errorbar(steps, mean, yerr=err, marker=MARKERS[i], capsize=3, label=task, color=f"C{i}")
    from matplotlib.ticker import NullLocator

    ticks = sorted({r.steps for r in rows})
    for ax, label in ((left, "discarded ‖Δ‖² − ‖Δ*‖²"), (right, "discarded share 1 − ρ²")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("fine-tune steps")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    left.set_title("DG-Hard@1 noise residual", fontsize=9)
    right.set_title("share of ‖Δ‖² it removes", fontsize=9)
    fig.savefig(path, format="png")
    return int(size[0] * DPI), int(size[1] * DPI)


def write_plots(cells: list[dict], where: Path) -> dict[str, Path]:
    """Both figures into `where`; returns {name: path} of those drawn."""
    where.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, plot in (("score_vs_rho", plot_score_vs_rho), ("noise_residual", plot_noise_residual)):
        path = where / f"{name}.png"
        if plot(cells, path) is not None:
            drawn[name] = path
    return drawn
