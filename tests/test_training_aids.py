"""The tiny model's training aids: the grounding attention (pointing) loss, soft coordinate
targets, and length-grouped batches (which must not change the loss)."""
from __future__ import annotations

import torch

from skyeye.model.config import ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import build_model, load_model
from skyeye.model.template import IGNORE, collate, encode_conversation
from skyeye.model.tokenizer import GRID_TOKENS
from skyeye.training.loop import CoordinateTargets, per_sample_loss
from skyeye.training.pointing import (
    PointingTargets,
    movers,
    overlapping,
    pointing_loss,
    token_regions,
)

REFER = ("<Img><ImageHere></Img> [refer] the red car", "{<10><20><30><40>}")
CAPTION = ("<Img><ImageHere></Img> [caption] describe the image", "a plane")


def _model(backbones):
    return build_model(ModelConfig(vision=VisionConfig(image_size=64)), backbones["vision"], backbones["llm"],
                       backbones["tokenizer"])


def _bench(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visual_token_regions_follow_the_alignment_layer_grouping():
    regions = token_regions(16, 4)  # 8 x 8 patches, 4 consecutive ones per token: half-row strips
    assert regions[0].tolist() == [0, 0, 50, 12.5]
    assert regions[1].tolist() == [50, 0, 100, 12.5]
    assert regions[15].tolist() == [50, 87.5, 100, 100]
    hit = overlapping(regions, (10, 20, 30, 40))  # rows 1-3, left half
    assert hit.nonzero().flatten().tolist() == [2, 4, 6]
    assert overlapping(regions, (60, 95, 60, 95)).nonzero().flatten().tolist() == [15]  # degenerate: its centre


def test_pointing_targets_find_each_answer_box_and_its_visual_tokens(tiny_backbones):
    model = _model(tiny_backbones)
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    detection = ("<Img><ImageHere></Img> [detection] car", "{<0><0><10><10>}<delim>{<60><60><90><90>}")
    batch = collate([encode_conversation(tok, [t], n) for t in (REFER, CAPTION, detection)], tok.pad_token_id)
    targets = PointingTargets(tok, model.image_token_id, n, 4)(batch["input_ids"], batch["labels"], [1, 1, 1])
    assert [t[0] for t in targets] == [0, 2, 2]  # no box in the caption; two in the detection answer
    grid = {tok.convert_tokens_to_ids(g): v for v, g in enumerate(GRID_TOKENS)}
    row, queries, visual, mask = targets[0]
    # the logits at each query position predict the next token: the four coordinates, in order
    assert [grid[batch["labels"][row, q + 1].item()] for q in queries] == [10, 20, 30, 40]
    assert (batch["input_ids"][row, visual] == model.image_token_id).all() and len(visual) == n
    assert mask.tolist() == overlapping(token_regions(n, 4), (10, 20, 30, 40)).tolist()
    assert targets[2][3].tolist() != targets[1][3].tolist()  # each detection box points at its own tokens
    # clips (several frames) are left out
    assert PointingTargets(tok, model.image_token_id, n, 4)(batch["input_ids"], batch["labels"], [4, 4, 4]) == []


def test_clip_answers_point_at_the_visual_tokens_that_move(tiny_backbones):
    model = _model(tiny_backbones)
    tok, n = model.tokenizer, model.visual_tokens_per_image()  # 4 patches per visual token
    frames, patches, width = 3, n * 4, 8
    torch.manual_seed(0)
    still = torch.randn(1, patches, width).repeat(frames, 1, 1)
    moving = still.clone()
    for f in range(frames):  # something covers patch 4f + 1, i.e. visual token f, in frame f
        moving[f, 4 * f + 1] += 5.0
    m = movers(moving, 4)
    # token f of frame f (where it is) and the same token in the next or previous frame (where it left)
    expected = {(0, 0), (1, 0), (1, 1), (0, 1), (2, 1), (1, 2), (2, 2)}
    assert {divmod(int(i), n) for i in m.nonzero().flatten()} == expected
    assert not movers(still, 4).any()  # a still clip has no movers
    clip = ("<Img><ImageHere></Img> [caption] describe the video", "a boat sails from left to right.")
    batch = collate([encode_conversation(tok, [t], frames * n) for t in (clip, clip)], tok.pad_token_id)
    vision_tokens = torch.cat([moving, still])
    targets = PointingTargets(tok, model.image_token_id, n, 4, motion=True)(
        batch["input_ids"], batch["labels"], [frames, frames], vision_tokens)
    assert len(targets) == 1  # the still clip has no target
    row, queries, visual, mask = targets[0]
    assert row == 0 and mask.tolist() == m.tolist() and len(visual) == frames * n
    assert (batch["input_ids"][0, visual] == model.image_token_id).all()
    answer = (batch["labels"][0] != IGNORE).nonzero().flatten()
    assert queries.tolist() == (answer - 1).tolist()  # every answer token is predicted looking at the movers
    # in a batch that mixes clips and an image, each sample finds its own encoder tokens
    mixed = collate([encode_conversation(tok, [clip], frames * n), encode_conversation(tok, [REFER], n),
                     encode_conversation(tok, [clip], frames * n)], tok.pad_token_id)
    found = PointingTargets(tok, model.image_token_id, n, 4, motion=True)(
        mixed["input_ids"], mixed["labels"], [frames, 1, frames],
        torch.cat([still, torch.randn(1, patches, width), moving]))
    assert [t[0] for t in found] == [1, 2] and found[1][3].tolist() == m.tolist()
    # without `motion`, clips are left out as before
    assert PointingTargets(tok, model.image_token_id, n, 4)(batch["input_ids"], batch["labels"], [frames, frames],
                                                           vision_tokens) == []


def test_pointing_loss_is_low_when_attention_sits_on_the_object():
    n_vis, t = 4, 10
    visual = torch.arange(1, 1 + n_vis)
    target = (0, torch.tensor([6, 7, 8, 9]), visual, torch.tensor([False, True, False, False]))
    on = torch.full((1, 2, t, t), 1e-3)
    on[0, :, 6:10, 2] = 1.0  # every head looks at visual token 1
    off = torch.full((1, 2, t, t), 1e-3)
    off[0, :, 6:10, 3] = 1.0
    logits = torch.zeros(1, 2, t, t, requires_grad=True)
    assert pointing_loss((on,), [0], [target]) < 0.01
    assert pointing_loss((off,), [0], [target]) > 3
    loss = pointing_loss((torch.softmax(logits, -1),), [0], [target])
    loss.backward()
    assert logits.grad[0, 0, 6, 2] < 0 < logits.grad[0, 0, 6, 3]  # gradient raises the object's token
    assert pointing_loss((on,), [0], []) is None


class _Tok:
    def convert_tokens_to_ids(self, tokens):
        return [10 + i for i in range(len(tokens))]

    def __len__(self):
        return 200


def test_soft_coordinate_targets_give_credit_for_near_misses():
    coords = CoordinateTargets(_Tok(), sigma=1.5)
    labels = torch.tensor([[IGNORE, 60, 5]])  # grid value 50, then an ordinary token
    near, far = torch.full((1, 3, 200), -5.0), torch.full((1, 3, 200), -5.0)
    near[0, 0, 61], far[0, 0, 70] = 10.0, 10.0  # one unit off / ten units off
    near[0, 1, 5] = far[0, 1, 5] = 10.0
    assert torch.allclose(per_sample_loss(near, labels), per_sample_loss(far, labels))  # plain CE: both wrong
    assert per_sample_loss(near, labels, coords) < per_sample_loss(far, labels, coords)
    exact = torch.full((1, 3, 200), -5.0)
    exact[0, 0, 60], exact[0, 1, 5] = 10.0, 10.0
    sharp = CoordinateTargets(_Tok(), sigma=0.05)  # a narrow Gaussian is plain CE
    assert torch.allclose(per_sample_loss(exact, labels, sharp), per_sample_loss(exact, labels), atol=1e-4)


def test_per_sample_loss_does_not_depend_on_padding(tiny_backbones):
    """What makes length groups exact: a sample's loss is the same alone or padded in a batch."""
    model = _model(tiny_backbones).eval()
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    long = ("<Img><ImageHere></Img> [caption] describe the image in many words please",
            "a plane and a car and a tank next to a long road")
    encs = [encode_conversation(tok, [t], n) for t in (REFER, long)]
    vis = torch.randn(2, 16, 64)
    together = collate(encs, tok.pad_token_id)
    alone = collate(encs[:1], tok.pad_token_id)
    assert together["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        both = per_sample_loss(model(together["input_ids"], together["attention_mask"], vision_tokens=vis).logits,
                               together["labels"])
        one = per_sample_loss(model(alone["input_ids"], alone["attention_mask"], vision_tokens=vis[:1]).logits,
                              alone["labels"])
    assert torch.allclose(both[0], one[0], atol=1e-5)


def test_grounding_probe_reports_each_layer_and_the_attention_on_the_object(tiny_backbones, tiny_instructions,
                                                                          tmp_path):
    """bench/grounding_probe.py on a dim-64 model: the samples asked for, one attention mass and
    one hidden-state probe per layer, masses that are fractions, a uniform reference that
    follows the grouping, and ceilings that count whole test samples."""
    import json

    from skyeye.formats.boxes import to_grid
    probe = _bench("grounding_probe")
    model = _model(tiny_backbones)
    model.save(tmp_path / "m")
    res = probe.probe(str(tmp_path / "m"), tiny_instructions, n_train=12, n_test=4)
    layers = model.llm.config.num_hidden_layers
    # The tiny corpus has more than 12 DIOR-RSVG refer samples in stage 1 and 4 in its test file.
    stage1 = json.loads((tiny_instructions / "stage1.json").read_text())
    assert sum(s["task"] == "refer" and s["source"] == "dior_rsvg" for s in stage1) >= 12
    test = json.loads((tiny_instructions / "eval/dior_rsvg_test.json").read_text())["samples"]
    assert len(test) >= 4 and (res["n_train"], res["n_test"]) == (12, 4)
    assert res["visual_tokens"] == 4 and res["alignment_group"] == 4
    assert len(res["attention_on_object"]) == layers and all(0 < a < 1 for a in res["attention_on_object"])
    assert {k for k in res if k.startswith("probe_hidden_L")} == {f"probe_hidden_L{k}" for k in range(layers + 1)}
    assert len(res["mae_teacher_forced"]) == 4
    # Uniform attention: 64 px / 16 px patches make a 4 x 4 grid, 4 patches per token, so token k
    # is grid row k, the strip 25k-25(k+1) of the grid's 0-100; the share of the 4 strips each
    # test box (the probe's samples: every len // 4-th) reaches, averaged.
    chosen = test[:: max(1, len(test) // 4)][:4]
    strips = [sum(25 * k < y2 and 25 * (k + 1) > y1 for k in range(4)) / 4
              for _, y1, _, y2 in (to_grid(r["box"], *r["image_size"]) for r in chosen)]
    assert res["attention_uniform"] == round(sum(strips) / 4, 3)
    assert res["ceiling_group1"]["visual_tokens"] == 16 and res["ceiling_group4"]["visual_tokens"] == 4
    for g in (1, 4):  # a share of the 4 test samples
        assert res[f"ceiling_group{g}"]["acc_at_0.5"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_grounding_ceiling_reads_boxes_that_the_patches_hold_and_not_from_noise():
    """The linear ceiling: patches that carry their object's box give every box back one patch
    per token; grouping 4 patches (object and background mixed) loses precision; noise
    features give about what guessing gives."""
    import numpy as np
    probe = _bench("grounding_probe")
    rng = np.random.default_rng(0)
    corner, size = rng.uniform(0, 60, (300, 2)), rng.uniform(20, 40, (300, 2))
    boxes = np.c_[corner, corner + size].round()
    patches = rng.normal(0, 0.01, (300, 64, 5))
    for i, b in enumerate(boxes):
        patches[i, probe.object_tokens(64, 1, b)] = np.r_[b / 100, 1]
    train = np.arange(300) < 200
    one, four = probe.ceiling(patches, boxes, train, 1), probe.ceiling(patches, boxes, train, 4)
    assert one == {"visual_tokens": 64, "acc_at_0.5": 1.0, "mae": one["mae"]} and one["mae"] < 2
    assert four["visual_tokens"] == 16 and four["mae"] > one["mae"] + 1
    assert probe.ceiling(rng.normal(size=(300, 64, 5)), boxes, train, 1)["acc_at_0.5"] < 0.3


def _elapsed_on_rank(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from skyeye.training.loop import agreed_elapsed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # rank 0 is past a 600 s budget, rank 1 not yet: both must see the same time
        seen = agreed_elapsed(600.5 if rank == 0 else 599.9)
        with open(f"{out_file}.{rank}", "w") as f:
            f.write(repr(seen))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_elapsed_time_that_stops_a_stage(tmp_path):
    """Each DDP rank's clock differs a little; a rank that stopped at the time budget alone
    hung the other in its next all-reduce (seen in a demo run). The budget check uses the
    largest elapsed time over the ranks."""
    import torch.multiprocessing as mp

    from skyeye.training.loop import agreed_elapsed
    out = tmp_path / "seen"
    mp.spawn(_elapsed_on_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    assert [float((tmp_path / f"seen.{r}").read_text()) for r in (0, 1)] == [600.5, 600.5]
    assert agreed_elapsed(12.0) == 12.0  # no process group: the local time


def test_capera_probe_reads_events_and_directions_off_the_generators_wording(tiny_backbones, tiny_synth, tmp_path):
    """bench/capera_probe.py: the clips' own captions name every event and direction; the same
    captions with each direction reversed keep every orientation and no direction; teacher
    forcing gives a probability, one attention mass per decoder layer and the share of it on the
    tokens that move."""
    from skyeye.data.readers import read_benchmark
    probe = _bench("capera_probe")
    clips = read_benchmark("capera", tiny_synth / "capera", ["train"])[0]
    own = [next((c for c in s.captions if probe.direction_of(c)), s.captions[0]) for s in clips]
    right = probe.score(clips, own)
    assert right["event_right"] == len(clips) and right["moving_clips"] > 0
    assert right["direction_right"] == right["orientation_right"] == right["moving_clips"]
    flip = {"left to right": "right to left", "right to left": "left to right", "top to bottom": "bottom to top",
            "bottom to top": "top to bottom"}
    reversed_ = [next((c.replace(a, b) for a, b in flip.items() if a in c), c) for c in own]
    wrong = probe.score(clips, reversed_)
    assert wrong["direction_right"] == 0 and wrong["orientation_right"] == wrong["moving_clips"]
    model = _model(tiny_backbones)
    model.save(tmp_path / "m")
    forced = probe.teacher_forced(load_model(tmp_path / "m").eval(), clips, 2)
    assert forced["clips"] == right["moving_clips"] and 0 < forced["p_direction_word"] < 1
    layers = model.llm.config.num_hidden_layers
    assert len(forced["attention_on_visual_tokens_by_layer"]) == layers
    assert all(0 < a <= 1 for a in forced["attention_on_visual_tokens_by_layer"])
    assert len(forced["share_of_visual_attention_on_movers_by_layer"]) == layers
    assert all(0 < a < 1 for a in forced["share_of_visual_attention_on_movers_by_layer"])
    assert 0 < forced["mover_token_share"] < 1  # the moving clips move: some of their tokens, not all
