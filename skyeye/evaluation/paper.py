"""The paper's published scores (SkyEyeGPT, Zhan et al. 2024, arXiv 2401.09712: its
captioning, VQA and grounding tables), with MiniGPT-v2 as a second reference, keyed like
our evaluation metrics: `{bench_split: {metric: value}}` on the paper's x100 scale.

These are real-data numbers from 7B models trained on GPUs. Our scores come from a tiny model
on the synthetic stand-in (SkyEye-Synth), so the two are not comparable: the report shows the
paper's figures beside ours, labelled as real data, for orientation only.
"""
from __future__ import annotations

from typing import Final

from ..formats.benchmarks import ACC_AT_05, CAPTION_METRICS

Scores = dict[str, dict[str, float]]  # bench_split -> metric -> score (x100); treat as read-only

def _captions(*values: float) -> dict[str, float]:
    """B1 / B2 / B3 / B4 / METEOR / ROUGE-L / CIDEr, in the paper's column order."""
    return dict(zip(CAPTION_METRICS, values, strict=True))


def _vqa(presence: float, comp: float, aa: float, rural_urban: float | None = None) -> dict[str, float]:
    out = {"acc_presence": presence, "acc_comp": comp, "aa": aa}
    if rural_urban is not None:
        out["acc_rural_urban"] = rural_urban
    return out


SKYEYEGPT: Final[Scores] = {
    "ucm_captions_test": _captions(90.71, 85.69, 81.56, 78.41, 46.24, 79.49, 236.75),
    "sydney_captions_test": _captions(91.85, 85.64, 80.88, 77.40, 46.62, 77.74, 181.06),
    "rsicd_test": _captions(86.71, 76.66, 67.31, 59.99, 35.35, 62.63, 83.65),
    "capera_test": _captions(80.13, 69.04, 59.56, 52.74, 33.97, 63.67, 91.90),
    "rsvqa_lr_test": _vqa(88.93, 88.63, 84.19, rural_urban=75.00),
    "rsvqa_hr_test": _vqa(84.95, 85.63, 85.29),
    "rsvqa_hr_test_phili": _vqa(83.50, 80.28, 81.89),
    "rsvg_val": {ACC_AT_05: 69.19},
    "rsvg_test": {ACC_AT_05: 70.50},
    "dior_rsvg_test": {ACC_AT_05: 88.59},
}

MINIGPT_V2: Final[Scores] = {
    "ucm_captions_test": _captions(81.10, 60.27, 45.10, 36.16, 32.41, 56.57, 60.66),
    "sydney_captions_test": _captions(77.35, 55.81, 40.58, 32.31, 29.92, 52.13, 33.78),
    "rsicd_test": _captions(83.10, 64.55, 47.83, 37.28, 30.21, 54.00, 52.41),
    "capera_test": _captions(81.82, 63.62, 49.31, 39.93, 32.61, 57.25, 56.47),
    "rsvqa_lr_test": _vqa(49.85, 63.09, 57.31, rural_urban=59.00),
    "rsvqa_hr_test": _vqa(64.80, 59.17, 61.98),
    "rsvqa_hr_test_phili": _vqa(66.34, 59.40, 62.87),
    "rsvg_val": {ACC_AT_05: 48.63},
    "rsvg_test": {ACC_AT_05: 45.48},
    "dior_rsvg_test": {ACC_AT_05: 80.47},
}

PAPER_MODELS: Final[dict[str, Scores]] = {"SkyEyeGPT": SKYEYEGPT, "MiniGPT-v2": MINIGPT_V2}


def flat(scores: Scores) -> dict[str, float]:
    """`{bench_split: {metric: v}}` -> `{"<bench_split>/<metric>": v}`, the evaluation run's naming."""
    return {f"{key}/{metric}": v for key, metrics in scores.items() for metric, v in metrics.items()}


# The paper's ablation (SkyEyeGPT, Zhan et al. 2024; real data, 7B): one tuning stage over all
# the instruction data, listed next to SkyEyeGPT's two stages in its captioning and grounding
# tables. It gives no one-stage VQA figures and no figures for one model per task.
ONE_STAGE: Final[Scores] = {
    "ucm_captions_test": _captions(90.58, 83.97, 78.52, 74.41, 45.10, 77.41, 220.36),
    "sydney_captions_test": _captions(91.62, 85.33, 80.48, 76.75, 45.61, 77.81, 173.98),
    "rsicd_test": _captions(83.14, 74.29, 66.04, 59.60, 34.49, 62.86, 82.94),
    "capera_test": _captions(75.74, 64.64, 55.62, 49.20, 31.82, 61.49, 85.11),
    "rsvg_val": {ACC_AT_05: 67.49},
    "rsvg_test": {ACC_AT_05: 66.98},
    "dior_rsvg_test": {ACC_AT_05: 86.24},
}
