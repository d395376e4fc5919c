"""The paper-size SkyEyeGPT on this machine: parameters, peak memory and wall time of
building the model, one training step and one greedy answer. Prints JSON.

    python bench/paper_scale.py [--llm-layers 2] [--vision-layers 2] [--dtype bfloat16] [--device cpu]
    python bench/paper_scale.py --llm-layers 32 --vision-layers 39 --repeats 1   # the whole model

On the project's 2-core machine the default takes ~2 min; the whole model ~5 min and 17 GiB
(docs/benchmarks.md; there the extrapolation undershot the training step by 14% in time and
0.9 GiB in memory).

The real shapes with random weights (no checkpoint is read): the EVA ViT-g/14 of BLIP-2 /
MiniGPT-v2 (39 blocks of 1408, 448 px -> 1 CLS + 1,024 patch tokens; `post_layernorm` is
MiniGPT-v2's `ln_vision`), the alignment layer (drop CLS, 1,024 x 1,408 -> 256 x 5,632 ->
Linear -> 256 x 4,096) and LLaMA-2-7B (32 layers) with LoRA r=64, alpha=16, dropout 0.05
on q_proj and v_proj. Models are built directly in --dtype on --device (torch's default
dtype and device while the classes initialise their weights), so no float32 copy exists;
the trainable parts (alignment layer, LoRA) are kept in float32, as peft keeps adapters.

Phases, each in the same process with the RSS high-water mark reset before it
(/proc/self/clear_refs; the train phase also reports the peak before AdamW's update):
  build     the three parts and the LoRA wrapper;
  train     one step on one sample: the image (frozen ViT under no_grad) + a ~100-token text,
            loss on the answer tokens, backward with gradient checkpointing on the LLM, AdamW
            on the alignment layer + LoRA (the last of --repeats steps is reported);
  generate  one greedy answer of --new-tokens tokens with the KV cache, from inputs_embeds.

With fewer layers than the paper's (32 LLM, 39 vision) each size runs in its own
subprocess: (K, J), (2K, J) and (K, 2J) layers; memory and times are fitted as
c + a * llm_layers + b * vision_layers and extrapolated to (32, 39) ("extrapolated": true).
Parameter counts are always exact (the full-size model is also built on the meta device).
The subprocesses run with MALLOC_MMAP_THRESHOLD_=65536 (unless set): with glibc's default,
freed large blocks stay in the heap and peak RSS overstates live memory.
Progress goes to stderr, JSON alone to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PAPER_LLM_LAYERS, PAPER_VISION_LAYERS = 32, 39
LORA_R, LORA_ALPHA, LORA_TARGETS = 64, 16, ["q_proj", "v_proj"]
VISION_WIDTH, GROUP, LLM_WIDTH = 1408, 4, 4096
# The paper's trainable parameters: LoRA on 2 modules of each of 32 layers, plus the projection
PAPER_LORA = PAPER_LLM_LAYERS * 2 * (LORA_R * LLM_WIDTH + LLM_WIDTH * LORA_R)  # 33,554,432
PAPER_PROJECTION = VISION_WIDTH * GROUP * LLM_WIDTH + LLM_WIDTH  # 23,072,768
PAPER_TRAINABLE = PAPER_LORA + PAPER_PROJECTION  # 56,627,200


def count_cpu_attention() -> None:
    """torch's FLOP counter knows the GPU attention kernels, not the CPU one; count it the same way."""
    from torch.utils import flop_counter as fc
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in fc.flop_registry:
        fc.register_flop_formula(fwd)(lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    if bwd not in fc.flop_registry:
        fc.register_flop_formula(bwd)(
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vision_config(layers: int):
    from transformers import Blip2VisionConfig
    return Blip2VisionConfig(hidden_size=VISION_WIDTH, intermediate_size=6144, num_hidden_layers=layers,
                             num_attention_heads=16, image_size=448, patch_size=14, qkv_bias=True,
                             layer_norm_eps=1e-6)


def llm_config(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=LLM_WIDTH, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)


def build(llm_layers: int, vision_layers: int, dtype: torch.dtype, device: str):
    """(vision, alignment layer, peft LLM), built directly in `dtype` on `device`."""
    from peft import LoraConfig, get_peft_model
    from transformers import Blip2VisionModel, LlamaForCausalLM
    with torch.device(device):
        vision = Blip2VisionModel._from_config(vision_config(vision_layers), dtype=dtype).eval()
        align = nn.Linear(VISION_WIDTH * GROUP, LLM_WIDTH, dtype=torch.float32)
        llm = LlamaForCausalLM._from_config(llm_config(llm_layers), dtype=dtype)
    vision.requires_grad_(False)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    llm = get_peft_model(llm, lora)  # freezes the base; adapters in float32 (peft's autocast_adapter_dtype)
    return vision, align, llm


def count(vision, align, llm) -> dict:
    lora = sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)
    out = {"vision": sum(p.numel() for p in vision.parameters()),
           "alignment_layer": sum(p.numel() for p in align.parameters()),
           "llm": sum(p.numel() for n, p in llm.named_parameters() if "lora_" not in n), "lora": lora}
    out["total"] = sum(out.values())
    out["trainable"] = sum(p.numel() for m in (vision, align, llm) for p in m.parameters() if p.requires_grad)
    return out


def paper_counts() -> dict:
    """Exact counts of the full-size model, built on the meta device (no memory, no init)."""
    c = count(*build(PAPER_LLM_LAYERS, PAPER_VISION_LAYERS, torch.bfloat16, "meta"))
    c["trainable_paper_formula"] = {"lora": PAPER_LORA, "projection": PAPER_PROJECTION, "total": PAPER_TRAINABLE,
                                    "formula": "32 x 2 x (64*4096 + 4096*64) + (5632*4096 + 4096)"}
    c["trainable_matches_paper"] = c["trainable"] == PAPER_TRAINABLE
    return c


def rss_mib() -> dict:
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f)
    return {k: int(kv[v].split()[0]) / 1024 for k, v in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the RSS high-water mark (Linux >= 4.0)
        f.write("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict:
    """Peak RSS since the last reset (MiB), and the accelerator's peak allocation where there is one."""
    out = {"peak_rss_mib": rss_mib()["peak"]}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def visual_embeds(vision, align, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():  # the frozen encoder; last_hidden_state has post_layernorm (ln_vision) applied
        tokens = vision(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS: (B, 1024, 1408)
    b, n, d = tokens.shape
    return align(tokens.reshape(b, n // GROUP, d * GROUP).float()).to(dtype)  # (B, 256, 4096)


def sample(device: str, dtype: torch.dtype, prompt_tokens: int, answer_tokens: int, seed: int = 0):
    """A 448 px image and MiniGPT-v2-style text: `prefix <Img>` + 256 visual tokens + `</Img> prompt`
    + answer, as random token ids (the weights are random anyway)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, 448, 448, generator=g).to(device, dtype)
    ids = torch.randint(3, 32000, (1, prompt_tokens + answer_tokens), generator=g).to(device)
    split = 6  # "<s>[INST] <Img>" before the image, the question after it
    return pixels, ids[:, :split], ids[:, split:prompt_tokens], ids[:, prompt_tokens:]


def matmul_tflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """A dense n x n matmul's achieved TFLOP/s in `dtype`: the machine's ceiling for these figures."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times[1:])[repeats // 2] / 1e12


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(llm_layers: int, vision_layers: int, dtype: torch.dtype, device: str, repeats: int,
            prompt_tokens: int, answer_tokens: int, new_tokens: int) -> dict:
    """One model size, the three phases in this process."""
    import peft  # noqa: F401  (imported before the build is timed)
    import transformers  # noqa: F401
    count_cpu_attention()
    res = {"llm_layers": llm_layers, "vision_layers": vision_layers}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    reset_peak()
    (vision, align, llm), t = timed(lambda: build(llm_layers, vision_layers, dtype, device))
    res["params"] = count(vision, align, llm)
    lora_formula = llm_layers * 2 * (LORA_R * LLM_WIDTH + LLM_WIDTH * LORA_R)
    assert res["params"]["trainable"] == lora_formula + PAPER_PROJECTION, res["params"]
    res["build"] = {"seconds": t, **peaks(), "rss_after_mib": rss_mib()["rss"]}
    log(f"  built in {t:.1f} s, RSS {rss_mib()['rss']:.0f} MiB")
    pixels, pre, mid, ans = sample(device, dtype, prompt_tokens, answer_tokens)
    embed = llm.get_input_embeddings()

    # train: one sample, loss on the answer, gradient checkpointing on the LLM
    llm.train()
    llm.config.use_cache = False
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for m in (align, llm) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    reset_peak()
    steps = []
    for i in range(repeats):  # FLOPs counted (torch.utils.flop_counter) in the first step only
        count_vis, count_fwd, count_bwd = (FlopCounterMode(display=False) if i == 0 else nullcontext()
                                           for _ in range(3))
        sync()
        t0 = time.perf_counter()
        with count_vis:
            img = visual_embeds(vision, align, pixels, dtype)
        t_vis = time.perf_counter() - t0
        with count_fwd:
            emb = torch.cat([embed(pre), img, embed(torch.cat([mid, ans], 1))], 1)
            labels = torch.full(emb.shape[:2], -100, device=device)
            labels[:, -ans.shape[1]:] = ans
            out = llm(inputs_embeds=emb, labels=labels)
        sync()
        t_fwd = time.perf_counter() - t0 - t_vis
        with count_bwd:
            out.loss.backward()
        peak_backward = rss_mib()["peak"]  # the step's peak before AdamW's update
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        total = time.perf_counter() - t0
        steps.append({"seconds": total, "vision_seconds": t_vis, "llm_forward_seconds": t_fwd,
                      "backward_and_optimizer_seconds": total - t_vis - t_fwd,
                      "sequence_tokens": emb.shape[1], "loss": out.loss.item(),
                      "peak_rss_mib_until_backward": peak_backward})
        if i == 0:
            flops = {"vision_and_alignment_flops": count_vis.get_total_flops(),
                     "llm_forward_flops": count_fwd.get_total_flops(),
                     "backward_flops": count_bwd.get_total_flops()}
        log(f"  train step {i + 1}/{repeats}: {total:.1f} s (vision {t_vis:.1f}, LLM forward {t_fwd:.1f})")
    res["train"] = dict(steps[-1], **peaks(), **flops, repeats=repeats,
                        all_seconds=[s["seconds"] for s in steps])
    del out, opt, emb
    llm.activation_checkpointing_disable()

    # generate: greedy, KV cache, from inputs_embeds
    llm.eval()
    llm.config.use_cache = True
    reset_peak()
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        img, t_vis = timed(lambda: visual_embeds(vision, align, pixels, dtype))
        emb = torch.cat([embed(pre), img, embed(mid)], 1)
        out = llm(inputs_embeds=emb, use_cache=True)
        sync()
        t_prefill = time.perf_counter() - t0 - t_vis
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens - 1):
            out = llm(input_ids=tok, cache=out.cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        total = time.perf_counter() - t0
    res["generate"] = {"seconds": total, "vision_seconds": t_vis, "prefill_seconds": t_prefill,
                       "prompt_tokens": emb.shape[1], "new_tokens": new_tokens,
                       "seconds_per_new_token": (total - t_vis - t_prefill) / max(new_tokens - 1, 1),
                       **peaks()}
    log(f"  answer of {new_tokens} tokens: {total:.1f} s (prefill {t_prefill:.1f})")
    return res


# What each figure scales with: the ViT's time with its blocks alone, the LLM's with its layers
# alone (fitting them on both would add the other size's noise), memory and build time with both.
FIGURES = {
    "build": {"seconds": "both", "peak_rss_mib": "both", "rss_after_mib": "both"},
    "train": {"vision_seconds": "vision", "llm_forward_seconds": "llm", "backward_and_optimizer_seconds": "llm",
              "peak_rss_mib": "both", "vision_and_alignment_flops": "vision", "llm_forward_flops": "llm",
              "backward_flops": "llm"},
    "generate": {"vision_seconds": "vision", "prefill_seconds": "llm", "seconds_per_new_token": "llm",
                 "peak_rss_mib": "both"},
}


def extrapolate(runs: list[dict], new_tokens: int) -> dict:
    """metric = c + a * llm_layers + b * vision_layers, fitted on the runs (K, J), (K2, J), (K, J2)
    and evaluated at (32, 39); a = 0 or b = 0 for the figures of one part (FIGURES)."""
    base = runs[0]
    k, j = base["llm_layers"], base["vision_layers"]
    by_llm = next((r for r in runs[1:] if r["llm_layers"] != k), None)
    by_vis = next((r for r in runs[1:] if r["vision_layers"] != j), None)
    out = {}
    for phase, keys in FIGURES.items():
        out[phase] = {}
        for key, dims in dict(keys, **({"peak_cuda_mib": "both"} if "peak_cuda_mib" in base[phase] else {})).items():
            a = b = 0.0
            if by_llm and dims in ("llm", "both"):
                a = (by_llm[phase][key] - base[phase][key]) / (by_llm["llm_layers"] - k)
            if by_vis and dims in ("vision", "both"):
                b = (by_vis[phase][key] - base[phase][key]) / (by_vis["vision_layers"] - j)
            full = base[phase][key] + a * (PAPER_LLM_LAYERS - k) + b * (PAPER_VISION_LAYERS - j)
            out[phase][key] = {"value": full, "per_llm_layer": a, "per_vision_layer": b}
    t, g = out["train"], out["generate"]
    t["seconds"] = {"value": sum(t[x]["value"] for x in ("vision_seconds", "llm_forward_seconds",
                                                         "backward_and_optimizer_seconds")), "sum_of_the_parts": True}
    g["seconds"] = {"value": g["vision_seconds"]["value"] + g["prefill_seconds"]["value"]
                    + (new_tokens - 1) * g["seconds_per_new_token"]["value"], "sum_of_the_parts": True}
    return out


def summary(report: dict) -> dict:
    """The headline figures at (32, 39) layers: measured where the run was full size, else extrapolated."""
    if report["extrapolated"]:
        ex = report["paper_size_extrapolated"]
        fig = {ph: {k: v["value"] for k, v in keys.items()} for ph, keys in ex.items()}
    else:
        fig = report["runs"][0]
    gib = 1 / 1024
    train_flops = sum(fig["train"][k] for k in ("vision_and_alignment_flops", "llm_forward_flops", "backward_flops"))
    return {"layers": "measured" if not report["extrapolated"] else "extrapolated to 32 LLM + 39 vision layers",
            "build_seconds": fig["build"]["seconds"], "build_peak_rss_gib": fig["build"]["peak_rss_mib"] * gib,
            "train_step_seconds": fig["train"]["seconds"], "train_peak_rss_gib": fig["train"]["peak_rss_mib"] * gib,
            "train_step_tflop": train_flops / 1e12,
            "train_step_tflop_per_s": train_flops / 1e12 / fig["train"]["seconds"],
            "generate_seconds": fig["generate"]["seconds"],
            "generate_prefill_seconds": fig["generate"]["prefill_seconds"],
            "generate_seconds_per_new_token": fig["generate"]["seconds_per_new_token"],
            "generate_peak_rss_gib": fig["generate"]["peak_rss_mib"] * gib,
            "trainable": report["params_paper_size"]["trainable"], "trainable_paper_formula": PAPER_TRAINABLE}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm-layers", type=int, default=2, help=f"LLM layers to build (paper: {PAPER_LLM_LAYERS})")
    p.add_argument("--vision-layers", type=int, default=2, help=f"ViT blocks (paper: {PAPER_VISION_LAYERS})")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the frozen weights and activations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="training steps per size; the last is reported")
    p.add_argument("--prompt-tokens", type=int, default=80, help="text tokens of the prompt (without the image)")
    p.add_argument("--answer-tokens", type=int, default=20, help="answer tokens (the loss)")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens of the greedy answer")
    p.add_argument("--single", action="store_true", help="measure this one size in this process (internal)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if not (1 <= args.llm_layers <= PAPER_LLM_LAYERS and 1 <= args.vision_layers <= PAPER_VISION_LAYERS):
        p.error("layers must be between 1 and the paper's 32 (LLM) / 39 (vision)")
    if args.single:
        res = measure(args.llm_layers, args.vision_layers, dtype, args.device, args.repeats,
                      args.prompt_tokens, args.answer_tokens, args.new_tokens)
        print(json.dumps(res))
        return

    k, j = args.llm_layers, args.vision_layers
    sizes = [(k, j)]
    if k < PAPER_LLM_LAYERS:
        sizes.append((min(2 * k, PAPER_LLM_LAYERS), j))
    if j < PAPER_VISION_LAYERS:
        sizes.append((k, min(2 * j, PAPER_VISION_LAYERS)))
    matmul = matmul_tflops(dtype, args.device)
    # glibc raises its mmap threshold as large blocks are freed and then keeps freed blocks in the heap:
    # peak RSS grew ~110 MiB per LLM layer more than live memory. A fixed threshold returns them.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"))
    runs = []
    for llm_layers, vision_layers in sizes:
        log(f"measuring {llm_layers} LLM + {vision_layers} vision layers in a subprocess")
        cmd = [sys.executable, __file__, "--single", "--llm-layers", str(llm_layers),
               "--vision-layers", str(vision_layers)]
        cmd += [f"--{a.replace('_', '-')}={getattr(args, a)}" for a in
                ("dtype", "device", "repeats", "prompt_tokens", "answer_tokens", "new_tokens")]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "matmul_2048_tflop_per_s": matmul, "MALLOC_MMAP_THRESHOLD_": env["MALLOC_MMAP_THRESHOLD_"],
        "dtype": args.dtype, "device": args.device,
        "build_method": f"directly in {args.dtype} on {args.device} (torch default dtype/device contexts); "
                        "alignment layer and LoRA in float32",
        "text": {"prompt_tokens": args.prompt_tokens, "answer_tokens": args.answer_tokens,
                 "visual_tokens": 256, "new_tokens": args.new_tokens},
        "params_paper_size": paper_counts(),
        "measured_layers": [{"llm": r["llm_layers"], "vision": r["vision_layers"]} for r in runs],
        "extrapolated": len(runs) > 1,
        "runs": runs,
    }
    if len(runs) > 1:
        report["paper_size_extrapolated"] = extrapolate(runs, args.new_tokens)
    report["summary"] = summary(report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
