"""`llmrl plot RUN_DIR [RUN_DIR ...]`: training curves from metrics.jsonl as one PNG.

Each panel plots every run that logged its metric, one line per run, so runs of different
algorithms are compared at a glance. The per-phase time breakdown is a stacked bar per step, one
panel per run (stacked bars of several runs do not overlay readably). A run still in progress
plots the steps it has; a torn last line is skipped; a step logged twice (an old resume) keeps
its last row.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrl.tracking import METRICS_FILE


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metric names or glob patterns; every match is a series


# The default panels, in reading order; a panel no run logged is left out.
DEFAULT_PANELS = (
    Panel("reward", ("reward/mean",)),
    Panel("accuracy", ("reward/acc",)),
    Panel("response length (tokens)", ("response/length_mean",)),
    Panel("truncated fraction", ("response/truncated_frac",)),
    Panel("entropy", ("actor/entropy",)),
    Panel("KL", ("actor/kl_ref", "actor/reward_kl", "actor/approx_kl")),
    Panel("clip fraction", ("actor/clipfrac",)),
    Panel("eval pass@1", ("eval/*/pass@1",)),
)
TIME_PREFIX = "time/"
TIME_TOTAL = "time/step"  # the sum of the phases, not a phase


class PlotError(ValueError):
    """A run directory without metrics, or a metric no run logged: exit 2."""


def read_run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (is it a run directory?)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the torn last line of a run being written, or of a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The steps that logged `key` with a finite number, and the values."""
    points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _matching(rows_by_run: dict[str, list[dict[str, Any]]], pattern: str) -> list[str]:
    keys = {k for rows in rows_by_run.values() for r in rows for k in r}
    return sorted(k for k in keys if fnmatch.fnmatchcase(k, pattern))


def plot_runs(run_dirs: list[Path], metrics: list[str] | None = None) -> Any:
    """The figure: one panel per metric (the defaults, or `metrics` as names or globs), then the
    time breakdown per run. Returns a matplotlib Figure."""
    # A bare Figure, not pyplot: no global figure registry to leak into, no GUI backend to pick.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows_by_run = {_label(Path(d), run_dirs): read_run_metrics(Path(d)) for d in run_dirs}
    panels = [Panel(m, (m,)) for m in metrics] if metrics else list(DEFAULT_PANELS)
    filled = [(p, keys) for p in panels if (keys := [k for pattern in p.keys for k in _matching(rows_by_run, pattern)])]
    if metrics:
        missing = [p.title for p in panels if p not in [f for f, _ in filled]]
        if missing:
            raise PlotError(f"no run logged {', '.join(missing)}")
    timed = [(label, rows) for label, rows in rows_by_run.items() if any(k.startswith(TIME_PREFIX) for r in rows for k in r)]
    count = len(filled) + (0 if metrics else len(timed))
    if count == 0:
        raise PlotError("nothing to plot: the runs have no metric rows yet")
    cols = 2 if count > 1 else 1
    rows_n = math.ceil(count / cols)
    fig = Figure(figsize=(6.4 * cols, 3.2 * rows_n))
    flat = list(fig.subplots(rows_n, cols, squeeze=False).flat)
    for ax in flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, (panel, keys) in zip(flat, filled):
        for label, rows in rows_by_run.items():
            for key in keys:
                steps, values = series(rows, key)
                if steps:
                    name = label if len(keys) == 1 else f"{label} {key}"
                    ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        low, high = ax.get_xlim()
        if high - low < 2:  # one step logged (an end-of-run eval): integer ticks need some width
            middle = round((low + high) / 2)
            ax.set_xlim(middle - 1, middle + 1)
        ax.grid(alpha=0.3)
        if len(rows_by_run) > 1 or len(keys) > 1:
            ax.legend(fontsize="small")
    if not metrics:
        # One colour per phase across every run's panel.
        phases = sorted({k for _, rows in timed for r in rows for k in r if k.startswith(TIME_PREFIX) and k != TIME_TOTAL})
        for ax, (label, rows) in zip(flat[len(filled):], timed):
            _time_bars(ax, label, rows, phases)
    for ax in flat[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _time_bars(ax: Any, label: str, rows: list[dict[str, Any]], phases: list[str]) -> None:
    bottom = [0.0] * len(rows)
    steps = [r["step"] for r in rows]
    for index, phase in enumerate(phases):
        if not any(phase in r for r in rows):
            continue
        heights = [float(r.get(phase, 0.0)) for r in rows]
        ax.bar(steps, heights, bottom=bottom, label=phase[len(TIME_PREFIX):], width=0.8, color=f"C{index % 10}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title(f"time per step (s): {label}")
    ax.set_xlabel("step")
    ax.legend(fontsize="small", ncols=2)


def _label(run_dir: Path, all_dirs: list[Path]) -> str:
    """The directory's name, or more of its path when two runs share a name."""
    names = [Path(d).name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def save_plot(run_dirs: list[Path], out: Path, metrics: list[str] | None = None) -> Path:
    fig = plot_runs(run_dirs, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def write_run_curves(run_dir: Path) -> Path | None:
    """curves.png at the end of a run; skipped (None) where matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return save_plot([run_dir], run_dir / "curves.png")
