"""The 8 benchmarks, their splits, the splits the paper scores, each one's task and
primary metric, and how metrics are named: the one place that names them, read by the
readers, the builder, the data gate, training's validation scores, the evaluation, the
promotion policy and the audit. Free of torch and MLflow.

Metric names: `<bench_split>/<metric>` (`dior_rsvg_test/acc_at_0.5`) on the paper's x100
scale; a baseline's `baseline.<name>/<bench_split>/<metric>`; a 95% bootstrap interval's
bounds `<name>_ci_low` / `<name>_ci_high`; a paired difference to a reference
`<bench_split>/<metric>_delta_vs_<reference>` (with its bounds); training's validation scores
carry the prefix `validation/` in front of the same names.

Test splits are sealed: the files under `eval/` (every split the paper scores) are read by
the evaluation alone; training-time monitoring and recipe choices read `validation/`.
"""
from __future__ import annotations

BENCHMARKS: tuple[str, ...] = (
    "ucm_captions", "sydney_captions", "rsicd", "capera", "rsvqa_lr", "rsvqa_hr", "rsvg", "dior_rsvg",
)
_TVT = ("train", "val", "test")
# the splits a benchmark's layouts can hold; a folder may lack some: CapERA as released has
# train and test only (its `val` is that of SkyEye-Synth's earlier layout, still read), and
# the builder then holds part of train out as validation (VALIDATION_KEYS below)
SPLITS: dict[str, tuple[str, ...]] = {name: _TVT for name in BENCHMARKS} | {"rsvqa_hr": (*_TVT, "test_phili")}
# the splits the paper reports numbers on (RSVQA-HR test set 2 is `test_phili`)
SCORED_SPLITS: dict[str, tuple[str, ...]] = {name: ("test",) for name in BENCHMARKS} | {
    "rsvqa_hr": ("test", "test_phili"),
    "rsvg": ("val", "test"),
}
TASK: dict[str, str] = {"ucm_captions": "caption", "sydney_captions": "caption", "rsicd": "caption",
                        "capera": "caption", "rsvqa_lr": "vqa", "rsvqa_hr": "vqa", "rsvg": "grounding",
                        "dior_rsvg": "grounding"}
TASKS = ("caption", "vqa", "grounding")
# bench_split keys in the paper's order, e.g. "rsvqa_hr_test_phili"
EVAL_KEYS: tuple[str, ...] = tuple(f"{b}_{s}" for b in BENCHMARKS for s in SCORED_SPLITS[b])
BENCHMARK_OF: dict[str, str] = {f"{b}_{s}": b for b in BENCHMARKS for s in SCORED_SPLITS[b]}
SPLIT_OF: dict[str, str] = {f"{b}_{s}": s for b in BENCHMARKS for s in SCORED_SPLITS[b]}
TASK_OF: dict[str, str] = {key: TASK[b] for key, b in BENCHMARK_OF.items()}
# Validation splits, the only benchmark splits training may read (monitoring, recipe choices):
# a benchmark's `val` split unless the paper scores it (RSVG's val is one of its test splits,
# sealed like them, so RSVG has no validation split); a release without a val split (CapERA's)
# gives its train images with crc32(file name) % HOLDOUT_MODULUS == 0, held out of training
# (`skyeye.data.instructions.validation_holdout`).
VALIDATION_KEYS: tuple[str, ...] = tuple(f"{b}_val" for b in BENCHMARKS if "val" not in SCORED_SPLITS[b])
HOLDOUT_MODULUS = 10
ALL_KEYS: tuple[str, ...] = (*EVAL_KEYS, *VALIDATION_KEYS)  # what an evaluation can score
BENCHMARK_OF |= {f"{b}_val": b for b in BENCHMARKS if f"{b}_val" in VALIDATION_KEYS}
SPLIT_OF |= {key: "val" for key in VALIDATION_KEYS}
TASK_OF |= {key: TASK[BENCHMARK_OF[key]] for key in VALIDATION_KEYS}
# the instruction folder's subfolders: the scored (test) splits and the validation splits
EVAL_DIR, VALIDATION_DIR = "eval", "validation"
SPLIT_SETS = {"test": (EVAL_DIR, EVAL_KEYS), "validation": (VALIDATION_DIR, VALIDATION_KEYS)}
# what the data gate accepts as an evaluation or validation file's benchmark/split/task
SCORED_FILE_KEYS: list[str] = sorted(f"{BENCHMARK_OF[k]}/{SPLIT_OF[k]}/{TASK_OF[k]}" for k in EVAL_KEYS)
VALIDATION_FILE_KEYS: list[str] = sorted(f"{BENCHMARK_OF[k]}/{SPLIT_OF[k]}/{TASK_OF[k]}" for k in VALIDATION_KEYS)

# metric names, on the paper's x100 scale
ACC_AT_05, AA, AA_ALL, OA, CIDER = "acc_at_0.5", "aa", "aa_all", "oa", "cider"
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", CIDER)
# the headline metric per task (the promotion policy compares these)
PRIMARY: dict[str, str] = {"caption": CIDER, "vqa": AA, "grounding": ACC_AT_05}
# the VQA types the paper averages into AA (count and area exist in RSVQA but are left out)
PAPER_VQA_TYPES = ("presence", "comp", "rural_urban")
PRIMARY_SCORE = "primary_score"  # mean of the primary metrics of the splits scored
VALIDATION = "validation/"  # prefix of training's validation scores


def metric(key: str, name: str, baseline: str | None = None) -> str:
    """`<key>/<name>`, or `baseline.<baseline>/<key>/<name>`."""
    return f"baseline.{baseline}/{key}/{name}" if baseline else f"{key}/{name}"


def ci_bounds(name: str) -> tuple[str, str]:
    """The names of a metric's interval bounds: `rsvg_test/acc_at_0.5_ci_low`, `..._ci_high`."""
    return f"{name}_ci_low", f"{name}_ci_high"


def delta_metric(key: str, name: str, reference: str) -> str:
    """A paired difference to a reference (a baseline, `production`): `<key>/<name>_delta_vs_<reference>`."""
    return f"{key}/{name}_delta_vs_{reference}"


def primary_metric(key: str) -> str:
    """`dior_rsvg_test` -> `dior_rsvg_test/acc_at_0.5`."""
    return metric(key, PRIMARY[TASK_OF[key]])


def primary_of(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The primary metric of each bench split present in a flat `<prefix><key>/<metric>` dict."""
    out = {}
    for key in ALL_KEYS:
        name = prefix + primary_metric(key)
        if name in metrics:
            out[key] = metrics[name]
    return out


def select(names: str | list[str] | None, on: str = "test") -> list[str]:
    """`all`, benchmark names (every split of the set) or bench_split keys -> bench_split keys
    of the split set `on` (`test`: the scored splits; `validation`)."""
    if on not in SPLIT_SETS:
        raise ValueError(f"--on: unknown split set {on!r}; known: {', '.join(SPLIT_SETS)}")
    keys = SPLIT_SETS[on][1]
    if names is None or names == "all" or names == ["all"]:
        return list(keys)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    out: list[str] = []
    for name in wanted:
        if name in keys:
            out.append(name)
        elif name in BENCHMARKS and any(BENCHMARK_OF[k] == name for k in keys):
            out += [k for k in keys if BENCHMARK_OF[k] == name]
        else:
            raise ValueError(f"--benchmarks: unknown {on} benchmark or split {name!r}; known: "
                             f"{', '.join(dict.fromkeys(BENCHMARK_OF[k] for k in keys))} or splits {', '.join(keys)}")
    return list(dict.fromkeys(out))


def folder_of(key: str) -> str:
    """The instruction subfolder holding a bench split's file: `eval` (sealed) or `validation`."""
    return VALIDATION_DIR if key in VALIDATION_KEYS else EVAL_DIR


def sealed(rel_path: str) -> bool:
    """Whether a path in the instruction folder holds a test split (a split the paper scores):
    training may not read it, only the evaluation does."""
    parts = rel_path.replace("\\", "/").split("/")
    stem = parts[-1].removesuffix(".json")
    return EVAL_DIR in parts[:-1] or stem in EVAL_KEYS


def spread(rows: list, n: int | None) -> list:
    """At most `n` rows spread evenly over a split's file (deterministic, covers every image group)."""
    if not n or len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]
