"""The registry with a real SQLite MLflow store and a real dim-64 SkyEyeGPT: register from
hand-made evaluation runs, load and serve `models:/skyeyegpt@production`, the promotion
policy (validation, floors, no regression), forced overrides, rollback, racing promotions,
and errors that name the version, alias or run at fault."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from projects import project_environment

from skyeye.datagate.gate import log_validation
from skyeye.formats.benchmarks import EVAL_KEYS, PRIMARY, TASK_OF
from skyeye.model import references
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.references import RegistryError
from skyeye.model.skyeyegpt import build_model
from skyeye.registry import packaging, promotion
from skyeye.registry import store as registry
from skyeye.registry.promotion import PromotionPolicy, PromotionRefused
from skyeye.tracking import names, runs
from skyeye.tracking.names import PROMOTION, ROLLBACK, read_records, record_tag
from tests.support import NOT_SIGNIFICANT, WORSE, eval_run, scores, vs_trivial

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16), max_new_tokens=4)
NAME = "skyeyegpt"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """An isolated project root and SQLite store; the environment is restored afterwards."""
    with project_environment(tmp_path_factory.mktemp("registry_project"), store=True) as root:
        runs.setup()
        yield root


@pytest.fixture(scope="module")
def model_dir(project, tiny_backbones) -> Path:
    b = tiny_backbones
    return build_model(CFG, b["vision"], b["llm"], b["tokenizer"]).save(project / "model")


@dataclass
class GateResult:  # the fields log_validation reads from the data gate's result
    success: bool
    n_records: int = 10
    failures: list = field(default_factory=list)
    seconds: float = 0.1

    def to_dict(self) -> dict:
        return {"success": self.success}


def validate(md5: str, passed: bool) -> None:
    log_validation(GateResult(passed, failures=[] if passed else ["x"]), md5, "rev-" + md5)
    time.sleep(0.01)  # the newest validation wins: keep start times apart


@pytest.fixture(scope="module")
def versions(project, model_dir):
    """Four versions of one model: good, better, worse (grounding regressed) and one whose data
    was never validated. good and worse come from a stage-2 run of a tuning job."""
    from skyeye.config import get_settings
    from skyeye.training.jobs import child_run, parent_run
    s = get_settings()
    job = parent_run("tune-test", s)
    stage2 = child_run(job, "stage2", s, {"skyeye.kind": "tuning-stage", "skyeye.model_dir": str(model_dir)})
    MlflowClient().set_terminated(stage2, "FINISHED")
    validate("md5-good", True)
    image = project / "example.png"
    Image.new("RGB", (96, 96), (30, 120, 60)).save(image)
    runs = {"good": eval_run(model_dir, scores(150, 75, 30), training_run=stage2),
            "better": eval_run(model_dir, scores(160, 78, 33)),
            "worse": eval_run(model_dir, scores(148, 74, 30, rsvg_test=12.0, dior_rsvg_test=10.0),
                              training_run=stage2),
            "unvalidated": eval_run(model_dir, scores(170, 80, 35), md5="md5-unvalidated")}
    out = {k: registry.register(model_dir, r, example_image=image if k == "good" else None) for k, r in runs.items()}
    return {"v": out, "runs": runs, "stage2": stage2, "job": job}


@pytest.fixture
def client(versions) -> MlflowClient:
    """No alias set: each promotion test starts from an empty registry state."""
    c = MlflowClient()
    for alias in c.get_registered_model(NAME).aliases:
        c.delete_registered_model_alias(NAME, alias)
    return c


def _png_b64(color=(200, 200, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _request(tmp_path: Path) -> pd.DataFrame:
    jpeg = tmp_path / "scene.jpg"
    Image.new("RGB", (80, 80), (40, 90, 160)).save(jpeg)
    return pd.DataFrame({"image": [_png_b64(), str(jpeg)],
                         "prompt": ["[refer] the white airplane at the top left", "[vqa] is there a harbour?"]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ registration
def test_register_records_lineage_and_is_idempotent(versions, model_dir):
    c, v, runs = MlflowClient(), versions["v"], versions["runs"]
    assert sorted(v.values()) == [1, 2, 3, 4]
    good = c.get_model_version(NAME, str(v["good"]))
    assert good.run_id == versions["stage2"]  # the source run is the run that produced the weights
    assert good.tags[names.TAG_EVAL_RUN] == runs["good"]
    assert good.tags[names.TAG_TRAINING_RUN] == versions["stage2"]
    assert good.tags[names.TAG_TUNING_JOB] == versions["job"]
    assert good.tags["skyeye.data.dvc_md5"] == "md5-good" and good.tags["skyeye.data.git_rev"] == "rev-md5-good"
    assert json.loads(good.tags[names.TAG_BACKBONES])["vision"].startswith("artifact:")
    assert c.get_run(runs["good"]).data.tags[names.TAG_MODEL_VERSION] == str(v["good"])
    assert c.get_run(versions["stage2"]).info.status == "FINISHED"  # reopened to log into, closed again
    better = c.get_model_version(NAME, str(v["better"]))
    assert better.run_id == runs["better"] and better.tags[names.TAG_TRAINING_RUN] == ""
    assert registry.register(model_dir, runs["good"]) == v["good"]  # a retried flow task registers nothing new
    assert len(c.search_model_versions(f"name = '{NAME}'")) == 4


def test_register_refuses_what_was_not_a_complete_evaluation(versions, model_dir, tmp_path):
    before = len(MlflowClient().search_model_versions(f"name = '{NAME}'"))
    good = scores(150, 75, 30)
    cases = [("no-such-run", "evaluation run 'no-such-run' not found"),
             (eval_run(model_dir, good, status="FAILED"), "is FAILED, not FINISHED"),
             (eval_run(model_dir, good, status="RUNNING"), "is RUNNING, not FINISHED"),
             (eval_run(model_dir, good, kind="tuning-stage"), "not an evaluation run"),
             (eval_run(model_dir, {}), "no primary metric")]
    for run_id, message in cases:
        with pytest.raises(RegistryError, match=message):
            registry.register(model_dir, run_id)
    with pytest.raises(RegistryError, match="is not the model evaluation run .* scored"):
        registry.register(tmp_path, eval_run(model_dir, good))
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == before


# ------------------------------------------------------------------ loading and serving
def test_production_alias_loads_and_answers(client, versions, tmp_path):
    promotion.promote(versions["v"]["good"], "production")
    model = mlflow.pyfunc.load_model("models:/skyeyegpt@production")
    answers = model.predict(_request(tmp_path))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image", "prompt"] and sig.outputs.input_names() == ["answer"]
    bad = _request(tmp_path)
    bad.loc[1, "image"] = "not-an-image"
    with pytest.raises(ValueError, match=r"row 1, column 'image'"):
        model.predict(bad)
    with pytest.raises(Exception, match="prompt"):
        model.predict(_request(tmp_path).drop(columns=["prompt"]))
    direct = model.unwrap_python_model()
    with pytest.raises(ValueError, match="missing column.*prompt"):
        direct.predict(None, _request(tmp_path).drop(columns=["prompt"]))


@pytest.mark.slow
def test_mlflow_models_serve_answers(client, versions, tmp_path):
    promotion.promote(versions["v"]["good"], "production")
    port = _free_port()
    # the server execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe: an unread pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/skyeyegpt@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                lines = [x for x in (tmp_path / "serve.log").read_text().splitlines() if "Downloading" not in x]
                pytest.fail("server did not come up:\n" + "\n".join(lines[-40:]))
            time.sleep(1)
        body = json.dumps({"dataframe_split": _request(tmp_path).to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert len(answer["predictions"]) == 2 and all(isinstance(a, str) for a in answer["predictions"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its workers
            proc.wait(timeout=30)
        log.close()


# ------------------------------------------------------------------ promotion policy
def test_worse_version_refused_forced_with_reason_then_rolled_back(client, versions):
    v = versions["v"]
    first = promotion.promote(v["good"], "production")
    assert first.previous is None and not first.forced
    with pytest.raises(PromotionRefused) as refused:
        promotion.promote(v["worse"], "production")
    msg = str(refused.value)
    assert "rsvg_test/acc_at_0.5 12.0 < production 30.0 - 3.0 tolerance (-18.0)" in msg
    assert "dior_rsvg_test/acc_at_0.5 10.0 < production 30.0 - 3.0 tolerance (-20.0)" in msg
    assert "primary_score" in msg and "ucm_captions" not in msg  # within its tolerance
    assert int(client.get_model_version_by_alias(NAME, "production").version) == v["good"]
    with pytest.raises(ValueError, match="--force needs --reason"):
        promotion.promote(v["worse"], "production", force=True)
    with pytest.raises(ValueError, match="--force needs --reason"):
        promotion.promote(v["worse"], "production", force=True, reason="  ")
    result = promotion.promote(v["worse"], "production", force=True, reason="hotfix for a caption bug")
    assert result.forced and result.previous == v["good"] and "FORCED" in result.render()
    tags = client.get_model_version(NAME, str(v["worse"])).tags
    # one record per decision, one tag: the refusal before, the forced promotion now
    assert not [k for k in tags if k.startswith(f"{PROMOTION}.production.")]
    record = json.loads(tags[record_tag(PROMOTION, "production")])
    assert set(names.PROMOTION_FIELDS) <= set(record)
    assert record["forced"] is True and record["reason"] == "hotfix for a caption bug"
    assert record["previous"] == str(v["good"]) and record["policy"] == "point scores"  # no per-item statistics
    assert record["comparison"]["rsvg_test/acc_at_0.5"] == -18.0
    assert any("rsvg_test" in f for f in record["overridden"])
    refusal = json.loads(tags[record_tag(names.REFUSAL, "production")])
    assert refusal["against"] == str(v["good"]) and any("dior_rsvg_test" in f for f in refusal["failures"])
    assert int(client.get_model_version_by_alias(NAME, "production").version) == v["worse"]

    assert promotion.rollback() == (v["worse"], v["good"])
    assert int(client.get_model_version_by_alias(NAME, "production").version) == v["good"]
    restored = read_records(client.get_model_version(NAME, str(v["good"])).tags, ROLLBACK)["production"]
    assert restored["from"] == str(v["worse"]) and restored["at"].endswith("+00:00")
    with pytest.raises(RegistryError, match="no previous production version"):
        promotion.rollback()


def test_better_version_promoted_with_deltas(client, versions):
    v = versions["v"]
    promotion.promote(v["good"], "production")
    result = promotion.promote(v["better"], "production")
    assert not result.forced and result.previous == v["good"]
    assert result.comparison["ucm_captions_test/cider"] == 10.0 and result.comparison["rsvg_test/acc_at_0.5"] == 3.0
    tags = client.get_model_version(NAME, str(v["better"])).tags
    assert json.loads(tags[record_tag(PROMOTION, "production")])["forced"] is False
    assert promotion.promote(v["better"], "production").unchanged  # already there: nothing rewritten


def test_primary_score_must_be_strictly_better():
    policy = PromotionPolicy()
    same = {f"{k}/{PRIMARY[TASK_OF[k]]}": 60.0 for k in EVAL_KEYS} | {"primary_score": 60.0} | vs_trivial(EVAL_KEYS)
    fails = promotion.policy_failures("production", same, policy, "passed", "md5", 1, dict(same))
    assert fails == [("primary_score 60.00 <= production 60.00 (+0.00): production needs a strictly better "
                      "primary score")]
    assert promotion.policy_failures("staging", same, policy, "passed", "md5", 1, dict(same)) == []


def test_staging_needs_a_passed_validation_and_the_floors(client, versions):
    v = versions["v"]["unvalidated"]
    with pytest.raises(PromotionRefused, match="data md5-unvalida: never validated"):
        promotion.promote(v, "staging")
    validate("md5-unvalidated", passed=False)
    with pytest.raises(PromotionRefused, match="data md5-unvalida: validation failed"):
        promotion.promote(v, "staging")
    validate("md5-unvalidated", passed=True)
    strict = PromotionPolicy.model_validate({"staging": {"task_floors": {"grounding": 50.0}}})
    with pytest.raises(PromotionRefused) as refused:
        promotion.promote(v, "staging", policy=strict)
    assert "rsvg_val/acc_at_0.5 35.0 < floor 50.0 (-15.0)" in str(refused.value)
    assert "dior_rsvg_test/acc_at_0.5 35.0 < floor 50.0" in str(refused.value)
    assert promotion.promote(v, "staging").alias == "staging"
    assert int(client.get_model_version_by_alias(NAME, "staging").version) == v


def test_racing_promotions_leave_one_complete_holder(client, versions):
    a, b = versions["v"]["good"], versions["v"]["better"]
    start, errors = threading.Barrier(2), []

    def go(version: int) -> None:
        start.wait()
        try:
            promotion.promote(version, "staging")
        except Exception as err:  # noqa: BLE001 - any failure in a thread is reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    holder = int(client.get_model_version_by_alias(NAME, "staging").version)
    other = b if holder == a else a
    record = read_records(client.get_model_version(NAME, str(holder)).tags, PROMOTION)["staging"]
    assert set(names.PROMOTION_FIELDS) <= set(record)
    # serialized: the winner saw the other's promotion, not the empty alias both started from
    assert record["previous"] == str(other)
    assert read_records(client.get_model_version(NAME, str(other)).tags, PROMOTION)["staging"]["previous"] == "none"


# ------------------------------------------------------------------ references, listing, errors
def test_resolve_and_unknown_references(client, versions):
    good = versions["v"]["good"]
    promotion.promote(good, "production")
    for ref in (good, str(good), f"v{good}", "production", "models:/skyeyegpt@production", f"models:/skyeyegpt/{good}"):
        assert references.resolve_version(ref) == good
    for ref, message in (("v99", "version 99 of skyeyegpt not found"), ("canary", "unknown model reference 'canary'"),
                         ("staging", "alias 'staging' of skyeyegpt is not set"),
                         ("models:/other@production", "names 'other'"), ("models:/skyeyegpt", "expected models:/")):
        with pytest.raises(RegistryError, match=message):
            references.resolve_version(ref)
    with pytest.raises(RegistryError, match="version 99 of skyeyegpt not found"):
        promotion.promote(99, "staging")
    with pytest.raises(RegistryError, match="unknown alias 'canary'"):
        promotion.promote(good, "canary")
    with pytest.raises(RegistryError, match="unknown alias 'canary'"):
        promotion.rollback("canary")
    with pytest.raises(RegistryError, match="alias 'staging' of skyeyegpt is not set: nothing to roll back"):
        promotion.rollback("staging")
    with pytest.MonkeyPatch.context() as mp:  # the registered name is read at call time
        mp.setenv("SKYEYE_REGISTERED_MODEL", "skyeyegpt-other")
        with pytest.raises(RegistryError, match="no model registered as 'skyeyegpt-other'"):
            references.resolve_version("production")


def test_list_versions_shows_aliases_scores_and_data(client, versions):
    v = versions["v"]
    promotion.promote(v["good"], "production")
    rows = registry.list_versions()
    assert [r.version for r in rows] == sorted(v.values(), reverse=True)
    good = next(r for r in rows if r.version == v["good"])
    assert good.aliases == ["production"] and good.data_md5 == "md5-good"
    assert good.scores == {"dior_rsvg_test/acc_at_0.5": 30.0, "rsvqa_lr_test/aa": 75.0,
                           "ucm_captions_test/cider": 150.0}
    table = registry.render_versions(rows)
    assert "production" in table and "md5-unva" in table and len(table.splitlines()) == 5


def test_policy_file_and_bad_policies(tmp_path):
    policy = promotion.load_policy(REPO / "configs" / "promotion.yaml")
    assert policy.staging.floor_of("rsvqa_hr_test_phili") == 30.0 and policy.staging.floor_of("rsvqa_lr_test") == 40.0
    assert policy.staging.floor_of("rsvg_test") == 0.0 and policy.staging.floor_of("capera_test") == 20.0
    assert policy.production.tolerance_of("dior_rsvg_test") == 3.0
    bad = tmp_path / "promotion.yaml"
    bad.write_text("staging:\n  floors:\n    rsvg_tset: 3\n")
    with pytest.raises(ValueError, match=r"(?s)promotion.yaml.*rsvg_tset"):
        promotion.load_policy(bad)


def test_backbones_travel_as_artifacts_or_hub_references(model_dir, tmp_path):
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "skyeyegpt.json").read_text())
    meta["paths"]["llm"] = "meta-llama/Llama-2-7b-chat-hf"  # a hub id: referenced, never copied
    (copy / "skyeyegpt.json").write_text(json.dumps(meta))
    artifacts, origin, _ = packaging.stage_artifacts(copy, tmp_path / "staged", copy_backbones=True)
    assert set(artifacts) == {"model", "vision"} and origin["llm"] == "hub:meta-llama/Llama-2-7b-chat-hf"
    assert sorted(p.name for p in Path(artifacts["model"]).iterdir()) == ["adapter", "alignment_layer.pt",
                                                                         "skyeyegpt.json", "tokenizer"]
    meta["paths"]["vision"] = str(tmp_path / "gone")
    (copy / "skyeyegpt.json").write_text(json.dumps(meta))
    with pytest.raises(packaging.PackagingError, match="vision backbone .*gone not found"):
        packaging.stage_artifacts(copy, tmp_path / "staged2", copy_backbones=True)


# ------------------------------------------------------------------ model references, one resolver
def test_model_references_resolve_one_way(client, versions, model_dir, project):
    name = registry.model_name()
    assert references.parse_model_uri(f"models:/{name}@production", name) == (name, None, "production")
    assert references.parse_model_uri(f"models:/{name}/3", name) == (name, "3", None)
    assert references.parse_model_uri("v3", name) == (name, "3", None)
    with pytest.raises(RegistryError, match="expected models:/"):
        references.parse_model_uri(f"models:/{name}/latest", name)
    # a folder as it is, a tuning-stage run id -> the folder it wrote, a registry URI -> its folder
    assert references.model_folder(str(model_dir)) == str(model_dir)
    assert references.model_folder(versions["stage2"]) == str(model_dir)
    promotion.promote(versions["v"]["good"], "production")
    assert references.model_folder(f"models:/{name}@production") == str(model_dir.resolve())
    with pytest.raises(RegistryError, match="neither a model folder, an MLflow run id nor a models:/ URI"):
        references.model_folder(str(project / "nowhere"))
    with pytest.raises(RegistryError, match="not a tuning-stage run"):
        references.model_folder(versions["job"])  # a tuning job's parent run names no model folder
    loaded = references.load(f"models:/{name}@production")
    assert loaded.version == versions["v"]["good"] and loaded.training_run == versions["stage2"]
    assert loaded.model.trainable_parameters()["alignment_layer"] > 0


def _chat(project: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`skyeye chat` as a user runs it: a new process, the project's settings, no MLflow variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"SKYEYE_PROJECT_ROOT": str(project), "SKYEYE_MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "flows.cli", "chat", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_chat_answers_with_the_production_model_by_default(client, versions, project, tmp_path):
    promotion.promote(versions["v"]["good"], "production")
    image = tmp_path / "scene.png"
    Image.new("RGB", (96, 96), (30, 120, 60)).save(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _chat(project, elsewhere, "--image", str(image), "[refer] the white airplane at the top left")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # an answer (a dim-64 model says little, but says it)
    assert list(elsewhere.iterdir()) == []  # no stray mlflow.db or mlruns/ where the command ran
    bad = _chat(project, elsewhere, "--image", str(image), "--model", "models:/skyeyegpt@canary", "[vqa] hi")
    assert bad.returncode == 2 and "--model" in bad.stderr and "canary" in bad.stderr  # errors go to stderr


def test_a_run_ends_finished_or_failed_with_its_block(project):
    with runs.tracked_run("skyeye-test-runs", "ok", {"k": "v"}) as ok:
        assert MlflowClient().get_run(ok).info.status == "RUNNING"
    with pytest.raises(RuntimeError, match="boom"):
        with runs.tracked_run("skyeye-test-runs", "broken", {}) as broken:
            raise RuntimeError("boom")
    c = MlflowClient()
    assert (c.get_run(ok).info.status, c.get_run(broken).info.status) == ("FINISHED", "FAILED")
    assert c.get_run(ok).data.tags["k"] == "v"


# ------------------------------------------------------------------ decisions on intervals
def _split_stats(right_share: float, seed: int, worse: dict[str, float] | None = None) -> dict:
    """Every scored split's per-item statistics when `right_share` of its items are answered right
    (a bench split named in `worse` gets that share instead): constructed prediction tables."""
    import numpy as np

    from skyeye.evaluation.metrics import caption_items, grounding_items, vqa_items
    out = {}
    for i, key in enumerate(EVAL_KEYS):
        n = 60 if TASK_OF[key] == "caption" else 300
        share = (worse or {}).get(key, right_share)
        right = np.zeros(n, dtype=bool)
        right[np.random.default_rng([seed, i]).permutation(n)[:round(share * n)]] = True
        ids = [f"{key}-{j}" for j in range(n)]
        if TASK_OF[key] == "caption":
            refs = [[f"a {c} building beside {j % 7} green trees"] * 2 for j, c in
                    zip(range(n), ["red", "blue", "grey", "white"] * n, strict=False)]
            preds = [r[0] if ok else "an empty field" for r, ok in zip(refs, right, strict=True)]
            out[key] = caption_items(preds, refs, meteor=False, ids=ids)
        elif TASK_OF[key] == "vqa":
            out[key] = vqa_items(["yes" if ok else "no" for ok in right], ["yes"] * n,
                                 ["presence" if j % 2 else "comp" for j in range(n)], ids=ids)
        else:
            out[key] = grounding_items(["{<10><10><50><50>}" if ok else "{<60><60><90><90>}" for ok in right],
                                       [(10, 10, 50, 50)] * n, [(100, 100)] * n, ids=ids)
    return out


def test_production_decides_on_intervals_and_records_one_decision(client, versions, model_dir, project):
    from typer.testing import CliRunner

    from skyeye.cli import app
    from tests.support import eval_run_with_items
    held = registry.register(model_dir, eval_run_with_items(model_dir, _split_stats(0.6, 0)))
    gain = registry.register(model_dir, eval_run_with_items(model_dir, _split_stats(0.8, 1)))
    hidden = registry.register(model_dir, eval_run_with_items(model_dir, _split_stats(0.8, 2, {"rsvg_test": 0.4})))
    promotion.promote(held, "production", force=True, reason="the baseline of this test")

    with pytest.raises(PromotionRefused) as refused:  # better on average, a real regression on one split
        promotion.promote(hidden, "production")
    (failure,) = refused.value.failures
    assert failure.startswith(f"rsvg_test/acc_at_0.5 40.0 vs production v{held} 60.0: -20.0, 95% interval [")
    refusal = json.loads(client.get_model_version(NAME, str(hidden)).tags[record_tag(names.REFUSAL, "production")])
    assert refusal["policy"] == "intervals" and refusal["against"] == str(held)
    assert refusal["comparison"]["rsvg_test/acc_at_0.5"]["verdict"] == "worse"
    assert refusal["comparison"]["primary_score"]["verdict"] == "better"  # the average hid it
    assert int(client.get_model_version_by_alias(NAME, "production").version) == held

    result = promotion.promote(gain, "production")
    assert not result.forced and result.previous == held
    tags = client.get_model_version(NAME, str(gain)).tags
    assert not [k for k in tags if k.startswith(f"{PROMOTION}.production.")]  # one tag, not one per field
    record = json.loads(tags[record_tag(PROMOTION, "production")])
    assert record["policy"] == "intervals" and record["previous"] == str(held)
    for key in EVAL_KEYS:
        d = record["comparison"][f"{key}/{PRIMARY[TASK_OF[key]]}"]
        assert d["verdict"] == "better" and d["paired"] and d["low"] <= d["delta"] <= d["high"]
    assert "better" in result.render()

    rows = {r["benchmark"]: r for r in promotion.scoreboard(hidden, gain)}
    assert rows["rsvg_test"]["vs production"].startswith("-40.0 [") and rows["rsvg_test"]["vs production"].endswith(
        "worse")
    out = CliRunner().invoke(app, ["models", str(hidden)])
    assert out.exit_code == 0, out.output
    assert f"against production (version {gain})" in out.output
    line = next(x for x in out.output.splitlines() if x.startswith("rsvg_test "))
    assert "40.0" in line and "worse" in line

    # scored on another data version: the same ids are not the same items, so nothing is paired
    other = registry.register(model_dir, eval_run_with_items(model_dir, _split_stats(0.95, 3), md5="md5-other"))
    validate("md5-other", True)
    result = promotion.promote(other, "production")
    assert result.comparison and not any(d["paired"] for d in result.comparison.values())
    assert all(d["verdict"] == "better" for d in result.comparison.values())


# ------------------------------------------------------------------ approval against the trivial baselines
def test_registration_records_the_approved_tasks_and_staging_needs_one(client, versions, model_dir):
    from typer.testing import CliRunner

    from skyeye.cli import app

    def approved(version: int) -> list[str]:
        return json.loads(client.get_model_version(NAME, str(version)).tags[names.TAG_APPROVED_TASKS])

    assert approved(versions["v"]["good"]) == ["caption", "vqa", "grounding"]  # better than each baseline everywhere
    # grounding below the centred box, and one VQA split not significantly above the majority answer
    one = registry.register(model_dir, eval_run(model_dir, scores(150, 75, 0), trivial={
        "grounding": WORSE, "rsvqa_hr_test_phili": NOT_SIGNIFICANT}))
    none = registry.register(model_dir, eval_run(model_dir, scores(150, 75, 0), trivial={
        "ucm_captions_test": NOT_SIGNIFICANT, "vqa": WORSE, "dior_rsvg_test": WORSE}))
    assert approved(one) == ["caption"] and approved(none) == []

    with pytest.raises(PromotionRefused) as refused:  # the floors pass; no task is approved
        promotion.promote(none, "staging")
    (failure,) = refused.value.failures
    assert failure.startswith("approved for no task (caption: ucm_captions_test no significant difference; vqa: ")
    assert "grounding: dior_rsvg_test worse)" in failure
    refusal = read_records(client.get_model_version(NAME, str(none)).tags, names.REFUSAL)["staging"]
    assert refusal["failures"] == [failure]
    with pytest.raises(PromotionRefused, match="approved for no task"):
        promotion.promote(none, "production")
    assert promotion.promote(one, "staging").alias == "staging"
    assert int(client.get_model_version_by_alias(NAME, "staging").version) == one

    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0, listing.output
    column = listing.output.splitlines()[0].index("approved for")
    shown = {line.split()[0]: line[column:].split()[0] for line in listing.output.splitlines()[1:]}
    assert (shown[str(one)], shown[str(none)], shown[str(versions["v"]["good"])]) == (
        "caption", "none", "caption,vqa,grounding")
    detail = CliRunner().invoke(app, ["models", str(one)])
    assert detail.exit_code == 0 and "approved for: caption (" in detail.output, detail.output

    # a version registered before approvals were recorded: none shown; promotion records it
    client.delete_model_version_tag(NAME, str(one), names.TAG_APPROVED_TASKS)
    assert "approved for: not recorded" in CliRunner().invoke(app, ["models", str(one)]).output
    promotion.promote(one, "production")
    assert approved(one) == ["caption"]


def test_a_version_inherits_its_training_data_licences_and_production_can_forbid_them(project, model_dir):
    """The stage run's licences (from its data card) reach the registered version, `skyeye models` and
    the audit print them, and production refuses a non-commercial source when the policy says so."""
    from skyeye.audit.chain import audit_model
    from skyeye.config import get_settings
    from skyeye.training.jobs import child_run, parent_run
    licences = {"dior_rsvg": "unknown", "geochat": "CC BY-NC 4.0"}
    s, c = get_settings(), MlflowClient()
    for alias in (c.get_registered_model(NAME).aliases if c.search_registered_models(f"name = '{NAME}'") else {}):
        c.delete_registered_model_alias(NAME, alias)  # no holder: production judges this version alone
    stage2 = child_run(parent_run("tune-licences", s), "stage2", s,
                       {"skyeye.kind": "tuning-stage", "skyeye.model_dir": str(model_dir),
                        **names.licences_tag(licences)})
    MlflowClient().set_terminated(stage2, "FINISHED")
    validate("md5-licensed", True)
    v = registry.register(model_dir, eval_run(model_dir, scores(150, 75, 30), md5="md5-licensed",
                                              training_run=stage2))
    tags = MlflowClient().get_model_version(NAME, str(v)).tags
    assert names.read_licences(tags) == licences
    row = next(r for r in registry.list_versions() if r.version == v)
    assert row.licences == licences and "CC BY-NC 4.0; unknown" in registry.render_versions([row])
    audit = audit_model(v)
    assert audit.licences == licences and "geochat: CC BY-NC 4.0" in audit.render()
    forbid = PromotionPolicy.model_validate({"licences": {"forbid": ["cc by-nc 4.0"]}})
    assert promotion.promote(v, "staging", policy=forbid).version == v  # staging is not checked
    with pytest.raises(PromotionRefused, match=r"source geochat is 'CC BY-NC 4.0', which production may not "
                                               r"carry \(rule: licences.forbid\)"):
        promotion.promote(v, "production", policy=forbid)
    refusal = read_records(MlflowClient().get_model_version(NAME, str(v)).tags, "skyeye.refusal")["production"]
    assert any("geochat" in f for f in refusal["failures"])
    assert promotion.promote(v, "production", policy=PromotionPolicy()).version == v  # off by default


# ------------------------------------------------------------------ a clean canary before production
def test_production_can_require_a_clean_canary_on_the_inference_log(client, versions):
    import shutil
    from datetime import UTC, datetime, timedelta

    from skyeye.config import get_settings
    from tests.support import write_log_rows
    v, store = versions["v"], Path(get_settings().inference_log_store)
    promotion.promote(v["good"], "production")
    policy = PromotionPolicy.model_validate({"canary": {"require": True, "min_requests": 50}})

    def logged(version: int, role: str, n: int, failed: int = 0) -> list[dict]:
        start = datetime.now(UTC) - timedelta(hours=1)
        return [{"time": start + timedelta(seconds=i), "request_id": f"{role}-{i}", "version": version, "role": role,
                 "task": "refer", "status": 500 if i < failed else 200, "latency_ms": 100.0} for i in range(n)]

    with pytest.raises(PromotionRefused) as refused:  # never served beside production
        promotion.promote(v["better"], "production", policy=policy)
    assert refused.value.failures == [
        f"canary vs production v{v['good']}: candidate version {v['better']} answered 0 logged requests, fewer than "
        "the 50 a canary needs (canary.min_requests) (rule: canary.require)",
        f"canary vs production v{v['good']}: no production request in the log to compare with (version "
        f"{v['good']}) (rule: canary.require)"]
    write_log_rows(store, logged(v["good"], "production", 150) + logged(v["better"], "candidate", 60, failed=6))
    with pytest.raises(PromotionRefused) as refused:
        promotion.promote(v["better"], "production", policy=policy)
    assert [f.split(": ", 1)[1] for f in refused.value.failures] == [
        "error rate 10.00% vs production 0.00%: more than 1.00% above (canary.max_error_rate_increase) "
        "(rule: canary.require)"]
    assert int(client.get_model_version_by_alias(NAME, "production").version) == v["good"]
    shutil.rmtree(store)
    write_log_rows(store, logged(v["good"], "production", 150) + logged(v["better"], "shadow", 60))
    assert promotion.promote(v["better"], "production", policy=policy).previous == v["good"]
