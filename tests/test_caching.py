"""What a retrain step's cache key holds, and which failures retry (no Prefect run needed)."""
import sqlite3

from flows.caching import StepKey, transient
from skyeye.datagate.expectations import ValidationResult
from skyeye.datagate.gate import GateFailed
from skyeye.registry.promotion import PromotionRefused


def step(model_config: str, md5: str, parent_run: str) -> str:
    return md5


def test_the_key_follows_inputs_config_content_and_code_not_bookkeeping(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYEYE_PROJECT_ROOT", str(tmp_path))
    from skyeye.config import get_settings
    get_settings.cache_clear()
    config = tmp_path / "model.yaml"
    config.write_text("a: 1\n")
    key = StepKey(inputs=("md5",), configs=("model_config",), code=("formats",))
    base = key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"})
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r2"}) == base  # where it logs
    assert key.base_key(step, {"model_config": str(config), "md5": "m2", "parent_run": "r1"}) != base  # the data
    config.write_text("a: 2\n")
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) != base  # the config
    config.write_text("a: 1\n")
    assert key.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) == base
    other_code = StepKey(inputs=("md5",), configs=("model_config",), code=("synth",))
    assert other_code.base_key(step, {"model_config": str(config), "md5": "m1", "parent_run": "r1"}) != base
    get_settings.cache_clear()


def test_only_transient_failures_retry():
    assert not transient(GateFailed(ValidationResult(success=False, n_records=1, seconds=0.1), "run1"))
    assert not transient(PromotionRefused(2, "production", ["dior_rsvg_test: 3.1 below the floor 5"]))
    assert transient(sqlite3.OperationalError("database is locked"))
    assert transient(TimeoutError("Ray start-up timed out"))
    assert transient(RuntimeError("(sqlite3.OperationalError) database is locked"))
    assert not transient(ValueError("stage config: max_steps must be positive"))
    assert not transient(None)
