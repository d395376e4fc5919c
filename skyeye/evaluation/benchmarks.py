"""The scored benchmark splits, their tasks and primary metrics: the one place that
names them, shared by the evaluation, the promotion policy and the audit."""
from __future__ import annotations

from ..data.readers import BENCHMARKS, SCORED_SPLITS

TASK = {"ucm_captions": "caption", "sydney_captions": "caption", "rsicd": "caption", "capera": "caption",
        "rsvqa_lr": "vqa", "rsvqa_hr": "vqa", "rsvg": "grounding", "dior_rsvg": "grounding"}
# bench_split keys in the paper's order, e.g. "rsvqa_hr_test_phili" (RSVQA-HR test set 2)
EVAL_KEYS: tuple[str, ...] = tuple(f"{b}_{s}" for b in BENCHMARKS for s in SCORED_SPLITS[b])
BENCHMARK_OF = {f"{b}_{s}": b for b in BENCHMARKS for s in SCORED_SPLITS[b]}
TASK_OF = {key: TASK[b] for key, b in BENCHMARK_OF.items()}
# the headline metric per task (the promotion policy compares these)
PRIMARY = {"caption": "cider", "vqa": "aa", "grounding": "acc_at_0.5"}
# VQA types the paper reports (count and area exist in RSVQA but are left out of its average)
PAPER_VQA_TYPES = ("presence", "comp", "rural_urban")
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def primary_of(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The primary metric of each bench split present in a flat `<prefix><key>/<metric>` dict."""
    out = {}
    for key in EVAL_KEYS:
        name = f"{prefix}{key}/{PRIMARY[TASK_OF[key]]}"
        if name in metrics:
            out[key] = metrics[name]
    return out


def select(names: str | list[str] | None) -> list[str]:
    """`all`, benchmark names (every scored split) or bench_split keys -> bench_split keys."""
    if names is None or names == "all" or names == ["all"]:
        return list(EVAL_KEYS)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    out: list[str] = []
    for name in wanted:
        if name in EVAL_KEYS:
            out.append(name)
        elif name in BENCHMARK_OF.values():
            out += [k for k in EVAL_KEYS if BENCHMARK_OF[k] == name]
        else:
            raise ValueError(f"--benchmarks: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                             f"or splits {', '.join(EVAL_KEYS)}")
    return list(dict.fromkeys(out))
