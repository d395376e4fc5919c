"""The served model under load: throughput, p50/p95/p99 latency and errors at 1, 4, 16 and
64 concurrent clients, with Ray Serve's batching on and off. Prints JSON.

    python bench/serve_load.py [--model models:/skyeyegpt@production] [--seconds 20] [--levels 1,4,16,64]
                               [--log on|off|compare] [--repeats 3] [--image-side 800]

`--log` sets the inference log of the runs (on, as configs/serve.yaml ships, or off), written
to a throw-away folder; `--log compare` measures its cost instead of batching's: batching on,
the log off and on in turn, `--repeats` times each, and reports the median throughput of
each and the log's cost, by those medians and by the median of the repeats' own off/on ratios
(`log_cost_paired`), and whether the log holds a row for every request sent.

    python bench/serve_load.py --canary 25 [--candidate staging] [--tiny-project]

With --canary PERCENT the comparison is production alone, then a canary of PERCENT with the
candidate beside it, then shadow (batching on in all three), and each level counts the
answers per version (the X-SkyEye-Version header). --tiny-project runs in a throw-away
project whose versions 1 and 2 are untrained dim-64 models (where no `make demo` registry
is at hand): their figures show what the router and the second version cost, not the model's.

This process deploys the model on a local Ray (configs/serve.yaml's limits, on a free
port); the clients run in a separate process on loopback, each level bounded in time and
in requests. A client answered 429 waits as Retry-After says, then asks again. Each
request is a `[refer]` question about a DIOR-RSVG test image of the project's data.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import socket
import time
from collections import Counter
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(url: str, body: dict, deadline: float, budget: int, out: list) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(budget):
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=body)
                out.append((r.status_code, time.perf_counter() - start, r.headers.get("retry-after"),
                            r.headers.get("x-skyeye-version")))
                if r.status_code in (429, 503):
                    await asyncio.sleep(float(r.headers.get("retry-after") or 1))
            except httpx.HTTPError as err:
                out.append((type(err).__name__, time.perf_counter() - start, None, None))


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def _batches(url: str) -> tuple[float, float]:
    """(conversations, generations) so far, from the replicas' Prometheus metrics (every version's)."""
    from prometheus_client.parser import text_string_to_metric_families
    total = {"skyeye_batch_size_sum": 0.0, "skyeye_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name in total:
                total[sample.name] += sample.value
    return total["skyeye_batch_size_sum"], total["skyeye_batch_size_count"]


def _level(url: str, body: dict, clients: int, seconds: float, per_client: int) -> dict:
    results: list = []
    before = _batches(url)
    start = time.perf_counter()
    deadline = start + seconds

    async def run() -> None:
        await asyncio.gather(*(_client(url, body, deadline, per_client, results) for _ in range(clients)))
    asyncio.run(run())
    elapsed = time.perf_counter() - start
    after = _batches(url)
    ok = [lat for status, lat, _, _ in results if status == 200]
    statuses = Counter(str(status) for status, _, _, _ in results)
    refused = [(s, ra) for s, _, ra, _ in results if s in (429, 503)]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(results), "ok": len(ok),
            "throughput_rps": round(len(ok) / elapsed, 2),
            "latency_s": {"p50": round(_percentile(ok, 0.5), 3), "p95": round(_percentile(ok, 0.95), 3),
                          "p99": round(_percentile(ok, 0.99), 3)},
            "p99_over_p50": round(_percentile(ok, 0.99) / _percentile(ok, 0.5), 2) if ok else None,
            "statuses": dict(statuses),
            "mean_batch_size": round((after[0] - before[0]) / max(after[1] - before[1], 1), 2),
            "answered_by_version": dict(Counter(v for status, _, _, v in results if status == 200)),
            "refusals_without_retry_after": sum(1 for _, ra in refused if not ra),
            "errors_other": sum(n for s, n in statuses.items() if s not in ("200", "429", "503"))}


def _clients_process(url: str, body: dict, levels: list[int], seconds: float, per_client: int, queue) -> None:
    queue.put([_level(url, body, c, seconds, per_client) for c in levels])


def _body(expression: str, image_path, model: str) -> dict:
    data = base64.b64encode(open(image_path, "rb").read()).decode()
    mime = "image/png" if str(image_path).lower().endswith(".png") else "image/jpeg"
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
        {"type": "text", "text": f"[refer] {expression}"}]}]}


def _run(url: str, body: dict, levels: list[int], seconds: float, per_client: int) -> list[dict]:
    """The levels, from a separate process (the clients must not share this one's cores' GIL)."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_clients_process, args=(url, body, levels, seconds, per_client,
                                                                          queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def _enlarged(image: Path, side: int) -> Path:
    """The sample image resized to side x side, as a JPEG in a temporary folder."""
    import tempfile

    from PIL import Image
    out = Path(tempfile.mkdtemp(prefix="serve_load_image_")) / f"{image.stem}_{side}.jpg"
    with Image.open(image) as im:
        im.convert("RGB").resize((side, side), Image.BICUBIC).save(out, quality=90)
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _compare_log(args, base, settings, image, expression, body, levels, report: dict) -> None:
    """Batching on; the log off and on in turn (alternating which goes first), `repeats` times;
    medians and the log's cost."""
    from skyeye.serving import deploy
    runs: dict[str, list[list[dict]]] = {"log_off": [], "log_on": []}
    sent_with_log = 0
    for i in range(args.repeats):  # the order alternates: neither always runs first after a rollout
        for mode, on in (("log_off", False), ("log_on", True))[::1 if i % 2 == 0 else -1]:
            cfg = base.model_copy(update={"inference_log": base.inference_log.model_copy(update={"enabled": on})})
            done = deploy.deploy(args.model, cfg, settings)
            deploy.verify(done.url, image, expression, done.version)
            result = _run(done.url, body, levels, args.seconds, args.per_client)
            runs[mode].append(result)
            sent_with_log += (1 + sum(r["requests"] for r in result)) if on else 0  # verify's question too
            report["version"] = done.version
    report["runs"] = runs
    report["median_throughput_rps"] = {mode: {c: _median([run[i]["throughput_rps"] for run in rs])
                                              for i, c in enumerate(levels)} for mode, rs in runs.items()}
    med = report["median_throughput_rps"]
    report["log_cost"] = {c: round(1 - med["log_on"][c] / max(med["log_off"][c], 1e-9), 3) for c in levels}
    # each repeat's off and on ran back to back: their ratio is free of the machine's slower drifts
    report["log_cost_paired"] = {}
    for i, c in enumerate(levels):
        costs = [round(1 - on[i]["throughput_rps"] / max(off[i]["throughput_rps"], 1e-9), 3)
                 for off, on in zip(runs["log_off"], runs["log_on"], strict=True)]
        report["log_cost_paired"][c] = {"median": round(_median(costs), 3), "runs": costs}
    report["log_check"] = {"requests_sent_with_log_on": sent_with_log, "log_store": settings.inference_log_store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry reference (default: production)")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=20, help="per level")
    parser.add_argument("--per-client", type=int, default=200, help="requests per client per level, at most")
    parser.add_argument("--log", default="on", choices=["on", "off", "compare"], help="the inference log")
    parser.add_argument("--repeats", type=int, default=3, help="with --log compare: runs of each")
    parser.add_argument("--canary", type=float, default=None, help="compare alone, a canary of this percent, shadow")
    parser.add_argument("--candidate", default="staging", help="the candidate's registry reference (with --canary)")
    parser.add_argument("--image-side", type=int, default=0, help="send the sample image enlarged to N x N pixels")
    parser.add_argument("--tiny-project", action="store_true", help="two untrained dim-64 versions, a temp project")
    args = parser.parse_args()
    import tempfile

    from skyeye.config import configure_environment, get_settings
    configure_environment()
    if args.tiny_project:
        _tiny_project()
    settings = get_settings().model_copy(update={"inference_log": tempfile.mkdtemp(prefix="serve_load_log_")})
    from skyeye.model.references import model_name
    from skyeye.serving import deploy
    from skyeye.serving.config import load_serve_config
    levels = [int(x) for x in args.levels.split(",")]
    image, expression = deploy.sample_question()
    if args.image_side:  # the demo corpus's images are 128 px; DIOR-RSVG's are 800: what the log hashes costs more
        image = _enlarged(image, args.image_side)
    body = _body(expression, image, model_name())
    base = load_serve_config().model_copy(update={"port": _free_port()})
    log = base.inference_log.model_copy(update={"enabled": args.log != "off"})
    base = base.model_copy(update={"inference_log": log})
    report: dict = {"levels": levels, "seconds_per_level": args.seconds, "queue_limit": base.queue_limit,
                    "max_batch_size": base.max_batch_size, "inference_log": args.log, "tiny_project": args.tiny_project}
    if args.canary is not None:
        from skyeye.serving.config import CanaryConfig
        runs = [(name, {"canary": CanaryConfig(candidate=args.candidate, mode=mode, canary_percent=args.canary)})
                for name, mode in (("alone", "off"), (f"canary_{args.canary:g}", "canary"), ("shadow", "shadow"))]
        base = base.model_copy(update={"canary": CanaryConfig(mode="shadow")})  # connect: room for two versions
    else:
        runs = [("batching_on", {}), ("batching_off", {"max_batch_size": 1})]
    started = deploy.connect(base)
    try:
        if args.log == "compare":
            _compare_log(args, base, settings, image, expression, body, levels, report)
        else:
            for mode, update in runs:
                done = deploy.deploy(args.model, base.model_copy(update=update), settings)
                if not args.tiny_project:  # untrained models answer no box
                    deploy.verify(done.url, image, expression, done.version)
                report[mode] = _run(done.url, body, levels, args.seconds, args.per_client)
                report["version"], report[f"{mode}_candidate"] = done.version, done.candidate
    finally:
        deploy.shutdown(started)
    if args.log == "compare":  # after the stop: the replicas have written their last rows
        from skyeye.monitoring.log_schema import read_log
        report["log_check"]["rows_logged"] = len(read_log(settings.inference_log_store))
    if args.canary is not None or args.log == "compare":
        print(json.dumps(report, indent=1))
        return
    on = {r["clients"]: r for r in report["batching_on"]}
    off = {r["clients"]: r for r in report["batching_off"]}
    report["batching_speedup"] = {c: round(on[c]["throughput_rps"] / max(off[c]["throughput_rps"], 1e-9), 2)
                                  for c in levels}
    print(json.dumps(report, indent=1))


def _tiny_project() -> None:
    """A throw-away project (a temp folder) holding versions 1 and 2 of untrained dim-64 models,
    registered on hand-made evaluation runs (tests/support.py), and a grounding test file."""
    import os
    import sys
    import tempfile
    from pathlib import Path

    from PIL import Image
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from skyeye.config import get_settings
    from skyeye.model.skyeyegpt import build_model
    from skyeye.model.tiny import TinyLLMSpec, TinyVisionSpec, save_random_backbones
    from skyeye.model.tokenizer import train_tokenizer
    from skyeye.registry.promotion import promote
    from skyeye.registry.store import register
    from skyeye.tracking import runs
    from tests.support import FITTABLE, eval_run, scores
    root = Path(tempfile.mkdtemp(prefix="serve_load_"))
    os.environ |= {"SKYEYE_PROJECT_ROOT": str(root), "SKYEYE_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    get_settings.cache_clear()
    runs.setup()
    texts = ["[refer] the red ship", "{<10><20><30><40>}", "[caption] a harbour with ships"] * 50
    tok = train_tokenizer(texts, root / "tok", 400)
    paths = save_random_backbones(root / "backbones", tok, TinyVisionSpec(image_size=64, patch_size=16, hidden_size=64,
                                                                          layers=2, heads=2),
                                  TinyLLMSpec(hidden_size=64, layers=2, heads=2, intermediate_size=128))
    image = root / "scene.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    folder = get_settings().instructions_dir / "eval"
    folder.mkdir(parents=True)
    (folder / "dior_rsvg_test.json").write_text(json.dumps({"benchmark": "dior_rsvg", "split": "test", "samples": [
        {"id": "0", "image": str(image), "expression": "the red ship", "image_size": [64, 64]}]}))
    for seed in (1, 2):
        import torch
        torch.manual_seed(seed)
        model = build_model(FITTABLE, paths["vision"], paths["llm"], paths["llm"]).save(root / f"model{seed}")
        register(model, eval_run(model, scores(10, 50, 1)))
    promote(1, "production", force=True, reason="serve_load: the tiny project's production")
    promote(2, "staging", force=True, reason="serve_load: the tiny project's candidate")


if __name__ == "__main__":
    main()
