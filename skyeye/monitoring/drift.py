"""Drift, measured: a window of the inference log against the served version's training data.

Pure: two `Sample`s (the reference, drawn from the training data of the served version's data
version, and the window, from the log) and the thresholds in, a `DriftReport` out. The monitor
flow (flows/monitor.py) reads the log, builds the reference (`reference.py`) and acts on it.

Signals, each with its test (docs/orchestration.md#drift gives the measurements behind them):
- task mix: population stability index (PSI) over the task identifiers (`refer`, `vqa`, ...);
- prompt length (characters) and image size (the side of a square of the same area): PSI over
  ten bins at the reference's quantiles;
- image content: the energy distance between the 16-dim frozen-encoder signatures of the two
  samples (each dimension standardised by the reference), with a permutation p-value (no
  bandwidth to choose, unlike MMD; sensitive to a shift of any moment and to dependence
  between dimensions, unlike per-dimension KS; the p-value is exact whatever the scale);
- answers: the share of `[refer]`/`[detection]` answers with no box that parses, and of answers
  cut at the token limit; absolute rates of the window (training data has no answers to compare).
PSI rather than chi-square or KS for mix, lengths and sizes: a test's p-value goes to zero on a
busy day for shifts of no consequence; PSI reads the same at 100 or 100,000 requests.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist

from ..formats.boxes import parse_boxes
from ..formats.prompts import TASK_IDENTIFIERS
from .config import MonitorConfig
from .signals import SIGNATURE_DIMS

NO_TASK = "none"  # a question without a task identifier (free text)
BOX_TASKS = ("refer", "detection")  # answered with boxes ([identify] answers with words)
PSI_PRIOR = 0.5  # counts added to every bin: PSI stays finite and small windows less noisy


def task_identifier(question: str) -> str:
    """The first task identifier of a question, without brackets (`refer`); `none` for free text."""
    found = sorted((question.find(i), i) for i in TASK_IDENTIFIERS if i in question)
    return found[0][1].strip("[]") if found else NO_TASK


def normalise_task(task: object) -> str:
    """The log's task field (`refer`, `[refer]`, null) as `task_identifier` names it."""
    text = str(task).strip().strip("[]").lower() if task is not None and not pd.isna(task) else ""
    return text or NO_TASK


def image_side(width, height) -> np.ndarray:
    """The side of a square of the image's area: one number per image size."""
    return np.sqrt(np.asarray(width, float) * np.asarray(height, float))


@dataclass
class Sample:
    """One side of the comparison: a task and prompt length per request (or training question),
    a side and a signature per distinct image."""
    tasks: list[str]
    prompt_chars: np.ndarray
    image_sides: np.ndarray
    signatures: np.ndarray  # (n, SIGNATURE_DIMS)

    def __post_init__(self):
        self.prompt_chars = np.asarray(self.prompt_chars, float)
        self.image_sides = np.asarray(self.image_sides, float)
        self.signatures = np.asarray(self.signatures, np.float32).reshape(-1, SIGNATURE_DIMS)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"tasks": np.asarray(self.tasks, dtype=str), "prompt_chars": self.prompt_chars,
                "image_sides": self.image_sides, "signatures": self.signatures}

    @classmethod
    def from_arrays(cls, arrays) -> Sample:
        return cls([str(t) for t in arrays["tasks"]], arrays["prompt_chars"], arrays["image_sides"],
                   arrays["signatures"])


@dataclass
class Answers:
    """What the window's answers say: grounding answers, those with no box, answers, those cut."""
    box_answers: int = 0
    unparsable: int = 0
    answers: int = 0
    cut: int = 0


def window_of(log: pd.DataFrame) -> tuple[Sample, Answers]:
    """The log's rows (`log_schema.SCHEMA`) as the window's Sample and Answers. Shadow rows repeat
    a request already logged; rows without an image count for task and length only; an image
    counts once for size and content however often it is asked about."""
    if "role" in log:
        log = log[log["role"].fillna("") != "shadow"]
    tasks = [normalise_task(t) for t in log["task"]]
    with_image = log[log["image_signature"].notna() & log["image_width"].notna() & log["image_height"].notna()]
    # one row per distinct image (by perceptual hash): an image asked about 100 times is one draw of
    # the image distribution, and repeats would make the permutation p-value too small
    with_image = with_image[with_image["image_phash"].isna() | ~with_image["image_phash"].duplicated()]
    signatures = (np.stack([np.asarray(s, np.float32) for s in with_image["image_signature"]])
                  if len(with_image) else np.zeros((0, SIGNATURE_DIMS), np.float32))
    answered = log[(log["status"].fillna(0) < 400) & log["answer"].notna()]
    boxes = answered[answered["task"].map(normalise_task).isin(BOX_TASKS)]
    answers = Answers(len(boxes), sum(not parse_boxes(a) for a in boxes["answer"]), len(answered),
                      int((answered["finish_reason"] == "length").sum()))
    return Sample(tasks, log["prompt_chars"].fillna(0).to_numpy(float),
                  image_side(with_image["image_width"], with_image["image_height"]), signatures), answers


# ---------------------------------------------------------------- tests

def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins, each bin given half
    a count more (an empty bin of a small window would otherwise weigh as a log of zero)."""
    e = np.asarray(expected, float) + PSI_PRIOR
    a = np.asarray(actual, float) + PSI_PRIOR
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def category_counts(ref: list[str], win: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = sorted(set(ref) | set(win))
    r, w = Counter(ref), Counter(win)
    return names, np.array([r[n] for n in names]), np.array([w[n] for n in names])


def quantile_edges(ref: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (repeated values merge bins)."""
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1])) if len(ref) else np.zeros(0)


def binned_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def standardise(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Each dimension to the reference's zero mean and unit spread: a shift along a quiet
    dimension counts as much as one along a loud one (distances are otherwise ruled by the
    few dimensions where images differ most)."""
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (reference, *others)]


def energy_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float, np.ndarray]:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| of two multivariate samples, its permutation
    p-value and the permuted statistics (the null). All permutations in one matrix product."""
    n, m = len(x), len(y)
    d = cdist(np.concatenate([x, y]).astype(np.float64), np.concatenate([x, y]).astype(np.float64))
    rng = np.random.default_rng(seed)
    labels = np.zeros((permutations + 1, n + m))
    labels[0, :n] = 1
    for row in labels[1:]:
        row[rng.choice(n + m, n, replace=False)] = 1
    dz = labels @ d  # row i: each point's summed distance to sample X under labelling i
    xx = np.einsum("ij,ij->i", dz, labels)
    total = d.sum()
    xy = dz.sum(axis=1) - xx
    yy = total - xx - 2 * xy
    stats = 2 * xy / (n * m) - xx / n ** 2 - yy / m ** 2
    p = (1 + np.sum(stats[1:] >= stats[0] - 1e-12)) / (permutations + 1)
    return float(stats[0]), float(p), stats[1:]


# ---------------------------------------------------------------- the report

@dataclass
class Signal:
    name: str
    statistic: float  # PSI, energy distance, or share
    threshold: float
    drifted: bool
    p_value: float | None = None
    note: str = ""

    def verdict(self) -> str:
        return "DRIFT" if self.drifted else "ok"


@dataclass
class DriftReport:
    rows: int
    min_rows: int
    signals: list[Signal] = field(default_factory=list)
    reference: Sample | None = None
    window: Sample | None = None
    answers: Answers | None = None
    null: np.ndarray | None = None  # the permuted energy distances

    @property
    def enough(self) -> bool:
        return self.rows >= self.min_rows

    @property
    def drifted(self) -> list[str]:
        return [s.name for s in self.signals if s.drifted]

    def metrics(self) -> dict[str, float]:
        out = {"rows": float(self.rows)}
        for s in self.signals:
            out[s.name] = s.statistic
            if s.p_value is not None:
                out[f"{s.name}_p"] = s.p_value
            out[f"{s.name}_drifted"] = float(s.drifted)
        return out

    def table(self) -> str:
        if not self.enough:
            return f"not enough traffic: {self.rows} requests in the window, {self.min_rows} needed"
        head = ("signal", "value", "threshold", "p", "verdict")
        rows = [(s.name, f"{s.statistic:.4g}", f"{s.threshold:g}", "-" if s.p_value is None else f"{s.p_value:.3g}",
                 s.verdict() + (f" ({s.note})" if s.note else "")) for s in self.signals]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (head, *rows)]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _share(name: str, hits: int, total: int, threshold: float) -> Signal:
    share = hits / total if total else 0.0
    return Signal(name, share, threshold, total > 0 and share > threshold, note=f"{hits} of {total}")


def compare(reference: Sample, window: Sample, answers: Answers, cfg: MonitorConfig) -> DriftReport:
    """Every signal of the window against the reference; too few window rows: no signals."""
    report = DriftReport(len(window.tasks), cfg.min_rows, reference=reference, window=window, answers=answers)
    if not report.enough:
        return report
    t = cfg.thresholds
    _, ref_tasks, win_tasks = category_counts(reference.tasks, window.tasks)
    value = psi(ref_tasks, win_tasks)
    report.signals.append(Signal("task_mix", value, t.task_mix_psi, value > t.task_mix_psi))
    for name, ref, win, limit in (("prompt_length", reference.prompt_chars, window.prompt_chars, t.prompt_length_psi),
                                  ("image_size", reference.image_sides, window.image_sides, t.image_size_psi)):
        if not len(win) or not len(ref):
            report.signals.append(Signal(name, 0.0, limit, False, note="no values"))
            continue
        edges = quantile_edges(ref, cfg.bins)
        value = psi(binned_counts(ref, edges), binned_counts(win, edges))
        report.signals.append(Signal(name, value, limit, value > limit))
    x, y = reference.signatures, window.signatures
    if len(y) > cfg.window_images:
        y = y[np.random.default_rng(cfg.seed).choice(len(y), cfg.window_images, replace=False)]
    if len(x) >= 2 and len(y) >= 2:
        stat, p, report.null = energy_test(*standardise(x, y), cfg.permutations, cfg.seed)
        report.signals.append(Signal("image_content", stat, t.image_content_p, p < t.image_content_p, p,
                                     note=f"energy distance, {len(x)} vs {len(y)} images"))
    else:
        report.signals.append(Signal("image_content", 0.0, t.image_content_p, False, note="too few images"))
    report.signals.append(_share("unparsable_boxes", answers.unparsable, answers.box_answers, t.unparsable_box_share))
    report.signals.append(_share("length_cut", answers.cut, answers.answers, t.length_cut_share))
    return report
