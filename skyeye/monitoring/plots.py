"""Plots of a drift report: one PNG per signal (what the monitor logs to MLflow) and an overview
of them all (docs/drift_monitor.png is one). Reference in grey, window in colour; the title of
each panel gives the statistic, its threshold and the verdict."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .drift import DriftReport, Signal, category_counts  # noqa: E402

REF, WIN = "#9e9e9e", "#d62728"


def _title(ax, label: str, s: Signal | None) -> None:
    if s is None:
        ax.set_title(label, fontsize=9)
        return
    p = "" if s.p_value is None else f", p={s.p_value:.3g}"
    ax.set_title(f"{label}: {s.statistic:.3g}{p} (threshold {s.threshold:g}) {s.verdict()}", fontsize=9,
                 color=WIN if s.drifted else "black")


def _task_mix(ax, r: DriftReport, s: Signal | None) -> None:
    names, ref, win = category_counts(r.reference.tasks, r.window.tasks)
    x = np.arange(len(names))
    ax.bar(x - 0.2, ref / max(ref.sum(), 1), 0.4, color=REF, label="training")
    ax.bar(x + 0.2, win / max(win.sum(), 1), 0.4, color=WIN, label="window")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("share of requests")
    ax.legend(fontsize=8)
    _title(ax, "task mix PSI", s)


def _histogram(ax, ref: np.ndarray, win: np.ndarray, xlabel: str, label: str, s: Signal | None) -> None:
    both = np.concatenate([ref, win])
    if len(both):
        bins = np.histogram_bin_edges(both, bins=30)
        ax.hist(ref, bins=bins, density=True, color=REF, alpha=0.7, label="training")
        ax.hist(win, bins=bins, density=True, color=WIN, alpha=0.5, label="window")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    _title(ax, label, s)


def _content(ax, r: DriftReport, s: Signal | None) -> None:
    """The signatures on the reference's first two principal axes."""
    ref, win = r.reference.signatures, r.window.signatures
    if len(ref) >= 2:
        mean = ref.mean(axis=0)
        _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
        for data, colour, label in ((ref, REF, "training"), (win, WIN, "window")):
            xy = (data - mean) @ vt[:2].T
            ax.scatter(xy[:, 0], xy[:, 1], s=6, color=colour, alpha=0.6, label=label)
        ax.legend(fontsize=8)
    ax.set_xlabel("encoder signature, principal axis 1")
    ax.set_ylabel("axis 2")
    _title(ax, "image content energy distance", s)


def _null(ax, r: DriftReport, s: Signal | None) -> None:
    if r.null is not None and s is not None:
        ax.hist(r.null, bins=30, color=REF, label="permuted (no drift)")
        ax.axvline(s.statistic, color=WIN, label="observed")
        ax.legend(fontsize=8)
    ax.set_xlabel("energy distance")
    _title(ax, "image content: permutation null", s)


def _answers(ax, r: DriftReport, signals: dict[str, Signal]) -> None:
    names = [n for n in ("unparsable_boxes", "length_cut") if n in signals]
    for i, n in enumerate(names):
        s = signals[n]
        ax.bar(i, s.statistic, 0.6, color=WIN if s.drifted else REF)
        ax.hlines(s.threshold, i - 0.4, i + 0.4, color="black", linestyles="dashed")
        ax.text(i, s.statistic, s.note, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), ["no box parses\n([refer], [detection])", "cut at the token limit"], fontsize=8)
    ax.set_ylabel("share of answers (dashed: threshold)")
    ax.set_ylim(0, 1)
    ax.set_title("answers", fontsize=9)


def _panels(r: DriftReport) -> dict[str, callable]:
    sig = {s.name: s for s in r.signals}
    return {
        "task_mix": lambda ax: _task_mix(ax, r, sig.get("task_mix")),
        "prompt_length": lambda ax: _histogram(ax, r.reference.prompt_chars, r.window.prompt_chars,
                                               "prompt length (characters)", "prompt length PSI",
                                               sig.get("prompt_length")),
        "image_size": lambda ax: _histogram(ax, r.reference.image_sides, r.window.image_sides,
                                            "image side (sqrt of width x height, pixels)", "image size PSI",
                                            sig.get("image_size")),
        "image_content": lambda ax: _content(ax, r, sig.get("image_content")),
        "image_content_null": lambda ax: _null(ax, r, sig.get("image_content")),
        "answers": lambda ax: _answers(ax, r, sig),
    }


def draw(report: DriftReport, folder: str | Path, title: str = "") -> list[Path]:
    """`<signal>.png` per signal and `overview.png` with all of them, in `folder`; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if report.reference is None or report.window is None or not report.enough:
        return []
    out = []
    panels = _panels(report)
    for name, panel in panels.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        panel(ax)
        fig.tight_layout()
        out.append(folder / f"{name}.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, panel in zip(axes.flat, panels.values(), strict=True):
        panel(ax)
    fig.suptitle(title or f"drift: {', '.join(report.drifted) or 'none'} ({report.rows} requests)")
    fig.tight_layout()
    out.append(folder / "overview.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)
    return out
