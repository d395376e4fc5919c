"""The evaluation report: PNG charts (matplotlib, Agg) and one self-contained HTML page that
embeds them, so MLflow's artifact viewer shows the whole report without other files.

Each chart function writes a PNG and returns its path. Our scores are labelled as
SkyEye-Synth (synthetic); the paper's are labelled as real-data figures from 7B models.
"""
from __future__ import annotations

import base64
import html
import math
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from ..formats.benchmarks import ALL_KEYS, PAPER_VQA_TYPES, PRIMARY, TASK_OF, TASKS  # noqa: E402
from ..formats.boxes import first_box_pixels, iou  # noqa: E402
from .baselines import TRIVIAL, approved_tasks  # noqa: E402
from .intervals import verdict  # noqa: E402
from .metrics import normalise_answer  # noqa: E402

OURS_LABEL = "ours (SkyEye-Synth, synthetic)"
PAPER_LABEL = "paper (real data, 7B)"
PANELS = (("caption", "Captioning: CIDEr"), ("vqa", "VQA: average of types (AA)"),
          ("grounding", "Grounding: Acc@0.5"))


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)  # figures are global state in pyplot; an evaluation draws many
    return out


def _nested(paper: dict) -> dict[str, dict[str, float]]:
    """Accept the paper's scores nested (`paper.SKYEYEGPT`) or flat (`<bench_split>/<metric>`)."""
    if all(isinstance(v, dict) for v in paper.values()):
        return paper
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, v in paper.items():
        key, metric = name.split("/", 1)
        out[key][metric] = v
    return out


def benchmark_chart(ours: dict[str, float], baselines: dict[str, dict[str, float]], paper: dict,
                    out: Path) -> tuple[Path, list[str]]:
    """One panel per task, grouped bars per bench split of its primary metric: ours, each
    baseline, and the paper's SkyEyeGPT number (hatched). Returns (png, legend labels)."""
    paper = _nested(paper)
    paper_flat = {f"{k}/{m}": v for k, ms in paper.items() for m, v in ms.items()}
    series = [(OURS_LABEL, ours), *((f"baseline: {n}", m) for n, m in baselines.items()), (PAPER_LABEL, paper_flat)]
    colours = plt.get_cmap("tab10").colors  # one colour per series across all panels
    styles = [{"color": colours[i % 10]} for i in range(len(series) - 1)]
    styles.append({"hatch": "//", "facecolor": "white", "edgecolor": "dimgray"})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8))
    for ax, (task, title) in zip(axes, PANELS, strict=True):
        metric = PRIMARY[task]
        keys = [k for k in ALL_KEYS if TASK_OF[k] == task  # the splits we (or a baseline) evaluated
                and any(f"{k}/{metric}" in scores for _, scores in series[:-1])]
        shown = [(i, label, scores) for i, (label, scores) in enumerate(series)
                 if any(f"{k}/{metric}" in scores for k in keys)]
        width = 0.8 / max(len(shown), 1)
        for slot, (i, label, scores) in enumerate(shown):
            values = [scores.get(f"{k}/{metric}", np.nan) for k in keys]
            bars = ax.bar(np.arange(len(keys)) + (slot - (len(shown) - 1) / 2) * width, values, width,
                          label=label, yerr=_error_bars(scores, [f"{k}/{metric}" for k in keys]),
                          error_kw={"elinewidth": 0.8, "capsize": 2}, **styles[i])
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.set_xticks(np.arange(len(keys)), keys, rotation=25, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("benchmark split")
        ax.set_ylabel(f"{metric} (x100)")
        if not keys:
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
    handles = {}
    for ax in axes:  # one legend for the figure; a series may be absent from some panels
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    order = [label for label, _ in series if label in handles]
    fig.suptitle("SkyEye-Synth (synthetic): our scores against trivial baselines, with 95% bootstrap intervals; "
                 "the paper's SkyEyeGPT figures are real data on a 7B model, not comparable")
    fig.tight_layout()
    legend = fig.legend([handles[label] for label in order], order, loc="upper center", ncol=len(order),
                        fontsize=8, bbox_to_anchor=(0.5, 0.0))
    labels = [t.get_text() for t in legend.get_texts()]
    return _save(fig, out), labels


def _error_bars(scores: dict[str, float], names: list[str]) -> np.ndarray | None:
    """(2, n) distances from each value to its interval's bounds (`<name>_ci_low/_ci_high`), or None."""
    if not any(f"{n}_ci_low" in scores for n in names):
        return None
    err = [[scores[n] - scores.get(f"{n}_ci_low", scores[n]) if n in scores else np.nan for n in names],
           [scores.get(f"{n}_ci_high", scores[n]) - scores[n] if n in scores else np.nan for n in names]]
    return np.clip(np.asarray(err, dtype=float), 0, None)


def grounding_examples(rows: list[dict], out: Path, n: int = 8) -> Path:
    """A grid of images with the ground-truth box (green) and the predicted box (red, dashed)."""
    rows = rows[:n]
    cols = min(4, max(len(rows), 1))
    nrows = max(math.ceil(len(rows) / cols), 1)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        image = Image.open(row["image"]).convert("RGB")
        w, h = image.size
        ax.imshow(image)
        gt = row["box"]
        ax.add_patch(Rectangle((gt[0], gt[1]), gt[2] - gt[0], gt[3] - gt[1], fill=False, edgecolor="lime", lw=2))
        pred = first_box_pixels(row["answer"], w, h)
        if pred is None:
            verdict = "no box parsed (miss)"
        else:
            ax.add_patch(Rectangle((pred[0], pred[1]), pred[2] - pred[0], pred[3] - pred[1], fill=False,
                                   edgecolor="red", lw=2, linestyle="--"))
            score = iou(pred, gt)
            verdict = f"IoU {score:.2f} ({'hit' if score > 0.5 else 'miss'})"
        ax.set_title(f"{verdict}\n{textwrap.fill(row['expression'], 38)}", fontsize=8)
    fig.suptitle("Grounding on SkyEye-Synth (synthetic): ground truth green, prediction red dashed")
    fig.tight_layout()
    return _save(fig, out)


def vqa_confusion(rows: list[dict], out: Path, top_k: int = 6) -> Path:
    """One confusion matrix per question type over its `top_k` most frequent answers and "other";
    colour = row-normalised share, numbers = counts."""
    by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        by_type[r["question_type"]].append((normalise_answer(r["answer"]), normalise_answer(r["prediction"])))
    paper_order = {t: i for i, t in enumerate(PAPER_VQA_TYPES)}  # the paper's types first, in its order
    types = sorted(by_type, key=lambda t: (paper_order.get(t, len(paper_order)), t))
    fig, axes = plt.subplots(1, max(len(types), 1), figsize=(4.2 * max(len(types), 1), 4.4), squeeze=False)
    for ax, qtype in zip(axes[0], types, strict=False):
        pairs = by_type[qtype]
        labels = [a for a, _ in Counter(a for a, _ in pairs).most_common(top_k)]
        if any(a not in labels or p not in labels for a, p in pairs):
            labels.append("other")
        index = {a: i for i, a in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=int)
        for answer, pred in pairs:
            counts[index.get(answer, len(labels) - 1), index.get(pred, len(labels) - 1)] += 1
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        accuracy = sum(a == p for a, p in pairs) / len(pairs)
        ax.set_title(f"{qtype} (n={len(pairs)}, accuracy {accuracy:.0%})", fontsize=9)
    fig.suptitle("VQA confusion per question type on SkyEye-Synth (synthetic), rows normalised")
    fig.tight_layout()
    return _save(fig, out)


def _derived(name: str) -> bool:
    """An interval bound or a paired difference: shown beside the score it belongs to."""
    return name.endswith(("_ci_low", "_ci_high")) or "_delta_vs_" in name


def _with_interval(scores: dict[str, float], name: str) -> str:
    if name not in scores:
        return ""
    low, high = scores.get(f"{name}_ci_low"), scores.get(f"{name}_ci_high")
    return _number(scores[name]) + ("" if low is None or high is None else f" [{low:.1f}, {high:.1f}]")


def metrics_table(ours: dict[str, float], baselines: dict[str, dict[str, float]], paper: dict) -> str:
    """An HTML table: one row per `<bench_split>/<metric>` we scored; ours, baselines (each with
    its 95% interval), paper."""
    paper = _nested(paper)
    head = ["metric", OURS_LABEL, *(f"baseline: {n}" for n in baselines), PAPER_LABEL]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    order = {key: i for i, key in enumerate(ALL_KEYS)}  # the paper's order, then anything else
    for name in sorted((k for k in ours if not _derived(k)), key=lambda k: (order.get(k.split("/")[0], len(order)), k)):
        key, _, metric = name.partition("/")
        cells = [_with_interval(ours, name), *(_with_interval(b, name) for b in baselines.values()),
                 _number(paper.get(key, {}).get(metric))]
        lines.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def comparison_table(ours: dict[str, float]) -> str:
    """An HTML table of the paired differences: per bench split, the primary metric's difference
    to each baseline on the same test items, its 95% interval and what it means."""
    lines = ["<table><tr><th>bench split</th><th>metric</th><th>against</th><th>difference [95% interval]</th>"
             "<th>verdict</th></tr>"]
    for key in ALL_KEYS:
        metric = PRIMARY[TASK_OF[key]]
        prefix = f"{key}/{metric}_delta_vs_"
        for name in sorted(n for n in ours if n.startswith(prefix) and not _derived(n.removeprefix(prefix))):
            low, high = ours.get(f"{name}_ci_low"), ours.get(f"{name}_ci_high")
            if low is None or high is None:
                continue
            lines.append(f"<tr><td>{key}</td><td>{metric}</td><td>{html.escape(name.removeprefix(prefix))}</td>"
                         f"<td>{ours[name]:+.1f} [{low:+.1f}, {high:+.1f}]</td><td>{verdict(low, high)}</td></tr>")
    return "\n".join(lines + ["</table>"])


def approval(ours: dict[str, float]) -> str:
    """An HTML line: the tasks the run approves (significantly above the task's trivial baseline
    on every split of the task, `baselines.approved_tasks`) and those it does not."""
    tasks = approved_tasks(ours)
    rest = [f"{t} (vs {TRIVIAL[t]})" for t in TASKS if t not in tasks]
    return (f"<p><b>Approved tasks: {html.escape(', '.join(tasks) or 'none')}</b>"
            + (f"; not approved: {html.escape(', '.join(rest))}" if rest else "")
            + ". A task is approved when its primary metric is significantly better than its trivial baseline "
              "on every split of the task (the verdicts below); a version is served with a warning, or refused, "
              "on the others.</p>")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def report_html(title: str, sections: list[tuple[str, Path | str]], out: Path) -> Path:
    """One self-contained page. A section is (heading, content): a Path to an image is embedded
    as base64, a Path to an .html file is inlined, any other Path is shown as text; a str is
    an HTML fragment (e.g. `metrics_table(...)`) and goes in as is."""
    parts = []
    for heading, content in sections:
        if isinstance(content, Path):
            suffix = content.suffix.lower()
            if suffix in _MIME:
                data = base64.b64encode(content.read_bytes()).decode()
                body = f'<img alt="{html.escape(content.name)}" src="data:{_MIME[suffix]};base64,{data}">'
            elif suffix in (".html", ".htm"):
                body = content.read_text()
            else:
                body = f"<pre>{html.escape(content.read_text())}</pre>"
        else:
            body = content
        parts.append(f"<section><h2>{html.escape(heading)}</h2>\n{body}\n</section>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
{chr(10).join(parts)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
