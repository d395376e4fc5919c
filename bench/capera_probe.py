"""What does a SkyEyeGPT get right about SkyEye-Synth's CapERA clips? A diagnostic for the
synthetic corpus only: it reads events and directions of motion off the wording that
`skyeye/synth/video.py` writes, so it means nothing on the real CapERA. Prints JSON:

- per split (`train`, `test`): greedy captions to the benchmark's prompt; `event_right`
  (the caption's event words name the clip's ERA event), and for clips that move,
  `direction_right` and `orientation_right` (horizontal against vertical), per event;
- `teacher_forced` (train clips whose training caption says where they move): the
  probability the model gives the right direction word after "from", and per decoder
  layer the attention mass (mean over heads) that position puts on the clip's visual tokens,
  and the share of that mass on the tokens that move (`skyeye.training.pointing.movers`;
  `mover_token_share` is what attention spread evenly would give).

    python bench/capera_probe.py --model <saved model folder> [--synth data/synth]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from skyeye.data.capera import event_words
from skyeye.data.readers import read_benchmark
from skyeye.evaluation.predictors import load_frames
from skyeye.formats.prompts import PHRASINGS, TASK_TO_IDENTIFIER
from skyeye.model.skyeyegpt import load_model
from skyeye.model.template import encode_conversation
from skyeye.synth.video import DIRECTIONS
from skyeye.training.pointing import movers

PROMPT = f"{TASK_TO_IDENTIFIER['video_caption']} {PHRASINGS['video_caption'][0]}"  # the benchmark's prompt
# the generator's wording per event (first match wins)
EVENT_WORDS = (("jam", "traffic_congestion"), ("slowly", "traffic_congestion"), ("traffic", "traffic_congestion"),
               ("queue", "traffic_congestion"), ("stuck", "traffic_congestion"), ("rac", "car_racing"),
               ("speed", "car_racing"), ("fast", "car_racing"), ("rush", "car_racing"), ("boat", "boating"),
               ("harvest", "harvesting"), ("machine", "harvesting"), ("farm", "harvesting"), ("still", "non-event"),
               ("nothing", "non-event"), ("quiet", "non-event"), ("static", "non-event"), ("no movement", "non-event"))


def event_of(caption: str) -> str:
    return next((event for word, event in EVENT_WORDS if word in caption), "?")


def direction_of(caption: str) -> tuple[bool, bool] | None:
    """(horizontal, forward) of the first direction the caption names."""
    return next((key for key, words in DIRECTIONS.items() if words in caption), None)


def captions(model, clips, frames: int, batch: int) -> list[str]:
    out = []
    for i in range(0, len(clips), batch):
        chunk = clips[i:i + batch]
        px = torch.cat([model.preprocess(load_frames(s.image, frames)) for s in chunk])
        out += model.ask([PROMPT] * len(chunk), frames=[frames] * len(chunk), pixel_values=px, max_new_tokens=30)
    return out


def score(clips, answers) -> dict:
    per_event: dict[str, Counter] = {}
    for s, a in zip(clips, answers, strict=True):
        n = per_event.setdefault(s.scene_class, Counter())
        n["clips"] += 1
        # the event as words: ERA's class names (`TrafficCongestion`) and the generator's alike
        n["event_right"] += event_words(event_of(a)) == event_words(s.scene_class)
        truth = next((d for c in s.captions if (d := direction_of(c))), None)
        if truth:
            said = direction_of(a)
            n["moving_clips"] += 1
            n["direction_right"] += said == truth
            n["orientation_right"] += said is not None and said[0] == truth[0]
    total = sum(per_event.values(), Counter())
    return {"clips": len(clips), "event_right": total["event_right"],
            "event_right_by_event": {e: [n["event_right"], n["clips"]] for e, n in sorted(per_event.items())},
            "moving_clips": total["moving_clips"], "direction_right": total["direction_right"],
            "orientation_right": total["orientation_right"],
            "direction_right_by_event": {e: [n["direction_right"], n["moving_clips"]]
                                         for e, n in sorted(per_event.items()) if n["moving_clips"]}}


def teacher_forced(model, clips, frames: int) -> dict:
    """At the position after "from" in a caption that says where the clip moves."""
    model.llm.set_attn_implementation("eager")  # SDPA returns no attention weights
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    probs, attention, on_movers, mover_share = [], [], [], []
    for s in clips:
        said = next(((c, d) for c in s.captions if (d := direction_of(c))), None)
        if said is None:
            continue
        caption, direction = said
        ids = torch.tensor([encode_conversation(tok, [(PROMPT, caption)], frames * n).input_ids])
        # the direction word's (first) token follows the caption up to "from" (whose end token is dropped)
        upto = caption[:caption.index(DIRECTIONS[direction]) + len("from")]
        k = len(encode_conversation(tok, [(PROMPT, upto)], frames * n).input_ids) - 1
        with torch.no_grad():  # the frozen encoder once: for the model and for finding the movers
            encoded = model.vision(model.preprocess(load_frames(s.image, frames)))
            out = model(ids, torch.ones_like(ids), frames=[frames], vision_tokens=encoded, output_attentions=True)
        moving = movers(encoded, model.cfg.alignment.group)
        visual = ids[0] == model.image_token_id
        probs.append(torch.softmax(out.logits[0, k - 1].float(), -1)[ids[0, k]].item())
        per_token = [a[0, :, k - 1, visual].mean(0) for a in out.attentions]  # (visual tokens,) per layer
        attention.append([a.sum().item() for a in per_token])
        if moving.any():
            on_movers.append([(a[moving].sum() / a.sum()).item() for a in per_token])
            mover_share.append(moving.float().mean().item())
    mean = lambda rows: np.round(np.mean(rows, 0), 3).tolist() if rows else None  # noqa: E731
    return {"clips": len(probs), "p_direction_word": round(float(np.mean(probs)), 3) if probs else None,
            "attention_on_visual_tokens_by_layer": mean(attention),
            "share_of_visual_attention_on_movers_by_layer": mean(on_movers), "mover_token_share": mean(mover_share)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a saved SkyEyeGPT folder (stage output or checkpoint)")
    ap.add_argument("--synth", default="data/synth", help="the SkyEye-Synth root holding capera/")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    frames = model.cfg.vision.video_frames
    result = {"model": args.model}
    for split in ("test", "train"):
        clips = read_benchmark("capera", Path(args.synth) / "capera", [split])[0]
        result[split] = score(clips, captions(model, clips, frames, args.batch))
        if split == "train":
            result["teacher_forced"] = teacher_forced(model, clips, frames)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
