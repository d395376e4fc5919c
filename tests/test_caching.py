"""What a retrain step's cache key holds (its inputs, configs, the code it reaches, what promote
reads from the registry), and which failures retry."""
import sqlite3
from pathlib import Path

import pytest
from projects import project_environment

from flows.caching import StepKey, transient
from skyeye.datagate.expectations import ValidationResult
from skyeye.datagate.gate import GateFailed
from skyeye.registry.promotion import PromotionRefused


def step(model_config: str, md5: str, parent_run: str) -> str:
    return md5


def other_step(model_config: str, md5: str, parent_run: str) -> str:
    from skyeye.formats.benchmarks import EVAL_KEYS  # other code: another key
    return md5 + EVAL_KEYS[0]


def test_the_key_follows_inputs_config_content_and_code_not_bookkeeping(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYEYE_PROJECT_ROOT", str(tmp_path))
    from skyeye.config import get_settings
    get_settings.cache_clear()
    config = tmp_path / "model.yaml"
    config.write_text("a: 1\n")
    key = StepKey(inputs=("md5",), configs=("model_config",))
    base = key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"})
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r2"}) == base  # where it logs
    assert key.base_key(step, {"model_config": str(config), "md5": "m2", "parent_run": "r1"}) != base  # the data
    config.write_text("a: 2\n")
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) != base  # the config
    config.write_text("a: 1\n")
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) == base
    assert key.base_key(other_step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) != base
    get_settings.cache_clear()


def test_only_transient_failures_retry():
    assert not transient(GateFailed(ValidationResult(success=False, n_records=1, seconds=0.1), "run1"))
    assert not transient(PromotionRefused(2, "production", ["dior_rsvg_test: 3.1 below the floor 5"]))
    assert transient(sqlite3.OperationalError("database is locked"))
    assert transient(TimeoutError("Ray start-up timed out"))
    assert transient(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not transient(ValueError("stage config: max_steps must be positive"))
    assert not transient(None)


# ---------------------------------------------------------------- the code a step runs

def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "# edited\n")


def test_the_import_closure_follows_every_kind_of_import_and_only_project_code(tmp_path):
    from skyeye.tracking.codehash import code_digest, import_closure
    root = plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\n\n\ndef f():\n    from . import b  # lazy, relative, a submodule by name\n",
        "pkg/b.py": "import numpy\nfrom pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..d import VALUE\n",
        "pkg/d.py": "VALUE = 1\n",
        "pkg/e.py": "import pkg.sub.f\n",
        "pkg/sub/f.py": "",
        "pkg/unrelated.py": "import pkg.a\n",
    })
    closure = {p.relative_to(root).as_posix() for p in import_closure(frozenset({"pkg.a"}), root)}
    assert closure == {"pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "pkg/d.py"}
    assert {p.name for p in import_closure(frozenset({"pkg.e"}), root)} == {"__init__.py", "e.py", "f.py"}
    before = code_digest(["pkg.a"], root)
    edit(root / "pkg/unrelated.py")  # imports a, but a does not import it
    assert code_digest(["pkg.a"], root) == before
    edit(root / "pkg/d.py")  # four imports away
    assert code_digest(["pkg.a"], root) != before


def test_a_step_key_covers_the_project_code_it_reaches_not_a_package_list(tmp_path):
    """The bug this closes: evaluate's key named evaluation, formats and model, so a change
    in skyeye/data (which the evaluation reads its benchmarks with) kept a stale evaluation."""
    import shutil

    from flows.caching import task_code
    from flows.retrain import evaluate_task, promote_task, synth_task
    from skyeye.tracking.codehash import ROOT, code_digest
    for package in ("skyeye", "flows"):  # a copy of the project's code: the checkout is never edited
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    modules, root = task_code(evaluate_task.fn)
    assert root == ROOT and "skyeye.evaluation.runner" in modules and "skyeye.data.records" not in modules
    steps = {t.name: task_code(t.fn)[0] for t in (evaluate_task, promote_task, synth_task)}
    before = {name: code_digest(mods, tmp_path) for name, mods in steps.items()}
    edit(tmp_path / "skyeye/data/records.py")  # evaluate_task -> skyeye.evaluation.runner -> skyeye.data.records
    after = {name: code_digest(mods, tmp_path) for name, mods in steps.items()}
    assert after["evaluate"] != before["evaluate"]
    assert after["promote"] == before["promote"] and after["synth"] == before["synth"]  # they never run it
    edit(tmp_path / "skyeye/audit/chain.py")  # no step runs the audit
    edit(tmp_path / "flows/schedule.py")
    assert {name: code_digest(mods, tmp_path) for name, mods in steps.items()} == after


PLANTED = {
    "planted_steps/__init__.py": "",
    "planted_steps/tasks.py": (
        "from prefect import flow, task\n\n"
        "from flows.caching import StepKey\n\n\n"
        "@task(cache_policy=StepKey(inputs=('x',)), persist_result=True)\n"
        "def double(x: int) -> int:\n"
        "    from planted_steps.helper import twice\n"
        "    return twice(x)\n\n\n"
        "@task(cache_policy=StepKey(inputs=('x',)), persist_result=True)\n"
        "def other(x: int) -> int:\n"
        "    from planted_steps.unrelated import VALUE\n"
        "    return VALUE\n\n\n"
        "@flow\n"
        "def run(x: int) -> str:\n"
        "    return double(x, return_state=True).name\n"),
    "planted_steps/helper.py": "from .deep import FACTOR\n\n\ndef twice(x):\n    return FACTOR * x\n",
    "planted_steps/deep.py": "FACTOR = 2\n",
    "planted_steps/unrelated.py": "VALUE = 1\n",
}


@pytest.mark.slow
def test_a_step_reruns_when_code_two_imports_away_changes_and_only_then(tmp_path, monkeypatch, prefect_harness):
    """Real Prefect, the real cache policy, a planted package: double -> helper -> deep."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from skyeye.config import get_settings
    code = plant(tmp_path / "code", PLANTED)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("SKYEYE_PROJECT_ROOT", str(tmp_path))
    get_settings.cache_clear()
    from planted_steps.tasks import run
    try:
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
            states = [run(1), run(1)]
            edit(code / "planted_steps/deep.py")
            states.append(run(1))
            edit(code / "planted_steps/unrelated.py")  # only the other task runs it
            states.append(run(1))
    finally:
        get_settings.cache_clear()
    assert states == ["Completed", "Cached", "Completed", "Cached"]


# ---------------------------------------------------------------- what promote reads

@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An empty project with a SQLite MLflow store."""
    from skyeye.tracking import runs
    with project_environment(tmp_path, monkeypatch, store=True):
        runs.setup()
        yield runs.client()


def test_promote_is_keyed_on_the_production_it_is_judged_against(registry, tmp_path):
    from flows.retrain import promote_task
    from skyeye.tracking.names import PROMOTION, TAG_EVAL_RUN, record_tag
    from tests.support import eval_run, scores
    registry.create_registered_model("skyeyegpt")
    evals = {v: eval_run(tmp_path, scores(10 * v, 10 * v, 10 * v)) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        registry.create_model_version("skyeyegpt", str(tmp_path), tags={TAG_EVAL_RUN: evals[v]})

    def key() -> str:
        return promote_task.cache_policy.base_key(promote_task.fn, {"version": 3, "policy_file": "promotion.yaml"})

    nobody = key()  # no production yet: a fixed marker
    registry.set_registered_model_alias("skyeyegpt", "production", "1")
    held_by_1 = key()
    assert held_by_1 != nobody and key() == held_by_1  # nothing changed: reused
    registry.set_registered_model_alias("skyeyegpt", "production", "2")
    held_by_2 = key()
    assert held_by_2 not in (nobody, held_by_1)  # production moved: promote runs again
    registry.log_metric(evals[2], "primary_score", 99.0)
    assert key() != held_by_2  # the holder's scores changed
    # version 3 promoted over version 2: it was judged against 2, so its own move keeps the key
    registry.set_model_version_tag("skyeyegpt", "3", record_tag(PROMOTION, "production"), '{"previous": "2"}')
    rescored = key()
    registry.set_registered_model_alias("skyeyegpt", "production", "3")
    assert key() == rescored
    # a cached decision stands while the registry still says it; a rollback since makes it recompute
    from flows.caching import production_agrees
    assert production_agrees({"alias": "production", "version": 3})
    assert not production_agrees({"alias": "staging", "version": 3})
    registry.set_registered_model_alias("skyeyegpt", "production", "2")  # rolled back by hand
    assert not production_agrees({"alias": "production", "version": 3})
    assert production_agrees({"alias": "staging", "version": 3}) and not production_agrees({"alias": "none"})


def test_the_build_step_reruns_when_a_llava_file_or_its_images_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYEYE_PROJECT_ROOT", str(tmp_path))
    from skyeye.config import get_settings
    get_settings.cache_clear()
    from flows.retrain import build_task
    (tmp_path / "synth").mkdir()
    (tmp_path / "images").mkdir()
    llava = tmp_path / "set.json"
    llava.write_text("[]")
    sources = {"geochat": {"path": str(llava), "images": str(tmp_path / "images")}}

    def key():
        return build_task.cache_policy.base_key(build_task.fn, {"root": str(tmp_path / "synth"), "sources": sources})
    base = key()
    assert key() == base
    llava.write_text("[ ]")  # the set's file
    assert key() != base
    base = key()
    (tmp_path / "images" / "a.png").write_bytes(b"x")  # its images folder
    assert key() != base
    base = key()
    sources["geochat"]["licence"] = "CC BY-NC 4.0"  # what the card will record
    assert key() != base
    get_settings.cache_clear()
