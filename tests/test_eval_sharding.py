"""The evaluation on Ray workers (`skyeye evaluate --num-workers N`): on the same saved
dim-64 model and the tiny corpus, 2 workers give exactly the metrics and predictions of the
in-process evaluation (every task, images and clips), in one MLflow run each; the shards cut on batch boundaries; bad
worker counts and models are refused before Ray starts."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from projects import project_environment
from typer.testing import CliRunner

from skyeye.evaluation.runner import load_eval_file, run_evaluation
from skyeye.evaluation.sharding import shard_bounds
from skyeye.formats.benchmarks import primary_of, select, spread
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import build_model

CFG = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16))
LIMIT, BATCH = 6, 2  # 3 batches per split: two workers get 2 and 1 of them
# every task, image and video inputs, benchmarks with two scored splits; half the splits, half the time
BENCHMARKS = "capera,rsvqa_hr,rsvg"
KEYS = select(BENCHMARKS)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_backbones):
    """A throw-away tracking store, in the environment so the driver and its workers share it,
    and a saved (untrained, so babbling: every row gets its own answer) model folder."""
    from skyeye.config import get_settings
    with project_environment(tmp_path_factory.mktemp("sharding"), store=True) as root:
        torch.manual_seed(3)
        b = tiny_backbones
        folder = build_model(CFG, b["vision"], b["llm"], b["tokenizer"]).save(root / "model")
        yield get_settings(), folder


def test_shards_are_contiguous_batch_aligned_and_cover_every_row():
    assert shard_bounds(6, 2, 2) == [(0, 4), (4, 6)]
    assert shard_bounds(7, 3, 2) == [(0, 4), (4, 6), (6, 7)]
    assert shard_bounds(3, 4, 2) == [(0, 2), (2, 3)]  # fewer batches than workers: idle workers get nothing
    assert shard_bounds(100, 3, 32) == [(0, 64), (64, 96), (96, 100)]
    for n, k, a in ((1, 1, 1), (65, 2, 32), (1000, 7, 5)):
        cuts = shard_bounds(n, k, a)
        assert cuts[0][0] == 0 and cuts[-1][1] == n and all(x[1] == y[0] for x, y in zip(cuts, cuts[1:], strict=False))
        assert all(start % a == 0 for start, _ in cuts)


@pytest.mark.slow
def test_two_workers_score_exactly_as_one_process(project, tiny_instructions):
    s, folder = project
    kwargs = {"limit": LIMIT, "batch_size": BATCH, "instructions": tiny_instructions, "settings": s,
              "progress": False}
    one = run_evaluation(str(folder), BENCHMARKS, **kwargs)
    two = run_evaluation(str(folder), BENCHMARKS, num_workers=2, **kwargs)

    assert two.predictions == one.predictions  # every row's answer (and baselines), in row order
    assert two.metrics == one.metrics  # exact: greedy answers on the same batches
    assert len({r["prediction"] for rows in one.predictions.values() for r in rows}) > 10  # not one answer for all

    client = MlflowClient(s.tracking_uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name(
        "skyeye-evaluation").experiment_id])}
    assert set(runs) == {one.run_id, two.run_id}  # one run per evaluation, whatever the workers
    a, b = runs[one.run_id], runs[two.run_id]
    assert a.info.status == b.info.status == "FINISHED"
    timing = {"eval_seconds", "interval_seconds"}  # wall times, not scores
    assert set(a.data.metrics) == set(b.data.metrics)
    for prefix in ("", "baseline.untuned/"):  # ours and the untuned model on every split, from the workers
        assert sorted(primary_of(b.data.metrics, prefix)) == sorted(KEYS)
    assert {k: v for k, v in b.data.metrics.items() if k not in timing} == \
        {k: v for k, v in a.data.metrics.items() if k not in timing}
    sizes = [len(spread(load_eval_file(tiny_instructions, k)["samples"], LIMIT)) for k in KEYS]
    assert a.data.params["num_workers"] == "1" and b.data.params["num_workers"] == "2"
    assert int(b.data.params["eval_shards"]) == sum(len(shard_bounds(n, 2, BATCH)) for n in sizes) > len(KEYS)
    assert a.data.params["eval_config"] == b.data.params["eval_config"]
    assert {k: v for k, v in b.data.tags.items() if not k.startswith("mlflow.")} == \
        {k: v for k, v in a.data.tags.items() if not k.startswith("mlflow.")}

    def artifacts(run_id: str, path: str = "") -> set[str]:
        out = set()
        for f in client.list_artifacts(run_id, path):
            out |= artifacts(run_id, f.path) if f.is_dir else {f.path}
        return out
    assert artifacts(one.run_id) == artifacts(two.run_id)
    assert {f"predictions/{k}.json" for k in KEYS} | {"report/report.html"} <= artifacts(two.run_id)


def test_a_bad_worker_count_or_model_is_refused_before_ray_starts(project, tiny_instructions, tmp_path):
    from skyeye.cli import app
    from skyeye.model.references import RegistryError
    s, folder = project
    zero = CliRunner().invoke(app, ["evaluate", "--model", str(folder), "--num-workers", "0",
                                    "--data", str(tiny_instructions)])
    assert zero.exit_code == 2 and "--num-workers 0" in zero.output and "must be 1" in zero.output
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
            run_evaluation(str(folder), "rsvg", num_workers=bad, instructions=tiny_instructions, settings=s)
    (tmp_path / "empty").mkdir()
    for ref in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(RegistryError, match="does not load"):
            run_evaluation(str(ref), "rsvg", num_workers=2, instructions=tiny_instructions, settings=s)
    import ray
    assert not ray.is_initialized()
