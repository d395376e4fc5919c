"""The canary report on inference-log rows written in the log's schema (tests/support.py):
shadow pairs by request, canary pairs by input, the verdict's tolerances, `skyeye canary
report`; the router's draw and its merge of both versions' metrics (no Ray needed)."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from projects import project_environment
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from skyeye.monitoring.canary import CanaryTolerance, canary_report
from skyeye.monitoring.log_schema import read_log
from tests.support import write_log_rows

START = datetime.now(UTC) - timedelta(hours=1)
BOX, OTHER, CAPTION = "{<10><20><30><40>}", "{<50><55><90><95>}", "a red ship in the harbour"
TOLERANCE = CanaryTolerance(min_requests=40)


def row(i: int, version: int, role: str, task: str = "refer", answer: str = BOX, status: int = 200,
        latency: float = 100.0, request_id: str | None = None, prompt: str = "[refer] the red ship") -> dict:
    return {"time": START + timedelta(seconds=i), "request_id": request_id or f"{role}-{i}", "model": "skyeyegpt",
            "version": version, "role": role, "task": task, "prompt": prompt, "image_phash": "c3c3c3c3c3c3c3c3",
            "answer": answer, "latency_ms": latency, "status": status, "completion_tokens": 4}


def shadow_rows() -> list[dict]:
    """100 requests answered by production (v1) and copied to the shadow (v2): half refer, half
    caption; the shadow gives another box to 20 of the refer questions, 10 ms slower."""
    out = []
    for i in range(100):
        task, answer = ("refer", BOX) if i % 2 else ("caption", CAPTION)
        theirs = OTHER if task == "refer" and i < 40 else answer
        out += [row(i, 1, "production", task, answer, latency=100 + i, request_id=f"r{i}"),
                row(i, 2, "shadow", task, theirs, latency=110 + i, request_id=f"r{i}")]
    return out


def test_a_shadow_is_compared_request_by_request(tmp_path):
    write_log_rows(tmp_path, shadow_rows())
    report = canary_report(read_log(str(tmp_path)), TOLERANCE)
    assert report.mode == "shadow" and (report.production.version, report.candidate.version) == (1, 2)
    agreement = {t.task: (t.pairs, t.agreement) for t in report.tasks}
    assert agreement == {"caption": (50, 1.0), "refer": (50, 0.6)}  # 20 of 50 refer answers differ
    assert report.production.p50_ms == pytest.approx(149.5) and report.candidate.p90_ms == pytest.approx(199.1)
    assert report.clean and report.candidate.error_rate == 0 and "verdict: clean" in report.render()


def test_a_canary_is_compared_input_by_input_and_its_regressions_named(tmp_path):
    prompts = ["[refer] the red ship", "[refer] the tank", "[refer] the plane"]
    rows = [row(i, 1, "production", prompt=prompts[i % 3]) for i in range(300)]
    # the candidate: another box for the plane, 5 of 100 requests failed, twice as slow
    rows += [row(300 + i, 2, "candidate", answer=OTHER if i % 3 == 2 else BOX, prompt=prompts[i % 3],
                 status=500 if i < 5 else 200, latency=200.0) for i in range(100)]
    write_log_rows(tmp_path, rows)
    report = canary_report(read_log(str(tmp_path)), TOLERANCE)
    assert report.mode == "canary" and report.candidate.requests == 100 and report.candidate.errors == 5
    assert [(t.task, t.pairs, round(t.agreement, 3)) for t in report.tasks] == [("refer", 3, 0.667)]
    assert report.failures == [
        "error rate 5.00% vs production 0.00%: more than 1.00% above (canary.max_error_rate_increase)",
        "p90 latency 200 ms vs production 100 ms: more than 25% above (canary.max_latency_increase)"]
    few = canary_report(read_log(str(tmp_path)), CanaryTolerance(min_requests=500, max_error_rate_increase=0.1,
                                                                 max_latency_increase=2))
    assert few.failures == ["candidate version 2 answered 100 logged requests, fewer than the 500 a canary needs "
                            "(canary.min_requests)"]
    with pytest.raises(ValueError, match="no request answered by a candidate"):
        canary_report(read_log(str(tmp_path / "empty")), TOLERANCE)


def test_skyeye_canary_report_prints_the_verdict_and_exits_1_when_not_clean(tmp_path, monkeypatch):
    from skyeye.cli import app
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "promotion.yaml").write_text(yaml.safe_dump({"canary": {"min_requests": 100}}))
    monkeypatch.setenv("SKYEYE_INFERENCE_LOG", str(tmp_path / "log"))
    write_log_rows(tmp_path / "log", shadow_rows())
    runner = CliRunner()
    with project_environment(tmp_path, monkeypatch):
        clean = runner.invoke(app, ["canary", "report", "--json", "--since", "2h"])
        assert clean.exit_code == 0, clean.output
        out = json.loads(clean.output)
        assert out["clean"] and out["candidate"]["requests"] == 100 and out["mode"] == "shadow"
        old = runner.invoke(app, ["canary", "report", "--since", "30m"])  # only the rows of the last 30 minutes
        assert old.exit_code == 2 and "no request answered by a candidate" in old.output
        bad = runner.invoke(app, ["canary", "report", "--since", "yesterday"])
        assert bad.exit_code == 2 and "--since 'yesterday': expected a duration" in bad.output
        write_log_rows(tmp_path / "log", [row(200 + i, 2, "shadow", status=504, request_id=f"s{i}")
                                          for i in range(10)], name="more")
        failing = runner.invoke(app, ["canary", "report"])
        assert failing.exit_code == 1 and "verdict: NOT clean" in failing.output
        assert "error rate 9.09% vs production 0.00%" in failing.output


def test_the_router_draws_the_canary_share_and_honours_a_named_version():
    import random

    from scipy.stats import binomtest

    from skyeye.serving.config import CanaryConfig
    from skyeye.serving.router import route

    def body(model: str) -> bytes:
        return json.dumps({"model": model, "messages": []}).encode()
    canary, rng, versions = CanaryConfig(mode="canary", canary_percent=25), random.Random(3), {"production": 1,
                                                                                                 "candidate": 2}
    drawn = [route(body("skyeyegpt"), versions, canary, rng)[0] for _ in range(4000)]
    assert binomtest(drawn.count("candidate"), 4000, 0.25).pvalue > 0.001
    assert route(body("skyeyegpt/2"), versions, canary, rng) == ("candidate", False)
    assert {route(body(m), versions, canary, rng) for m in ("skyeyegpt/1", "skyeyegpt/7")} == {("production", False)}
    assert route(b"{not json", versions, canary, rng) == ("production", False)  # production's replica says 400
    shadow = CanaryConfig(mode="shadow")
    assert {route(body("skyeyegpt"), versions, shadow, rng) for _ in range(50)} == {("production", True)}
    assert route(body("skyeyegpt/2"), versions, shadow, rng) == ("candidate", False)
    promoted = {"production": 2, "candidate": 2}  # the candidate became production: it gets nothing
    assert {route(body("skyeyegpt"), promoted, m, rng) for m in (canary, shadow) for _ in range(50)} == {
        ("production", False)}


def test_both_versions_metrics_merge_into_one_family_each():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from skyeye.serving.router import merge_exposition
    texts = []
    for version, role, n in (("1", "production", 3), ("2", "candidate", 1)):
        registry = CollectorRegistry()
        Counter("skyeye_requests", "HTTP requests", ["status", "version", "role"], registry=registry) \
            .labels("200", version, role).inc(n)
        texts.append(generate_latest(registry).decode())
    merged = merge_exposition(texts)
    assert merged.count("# TYPE skyeye_requests_total counter") == 1
    (family,) = [f for f in text_string_to_metric_families(merged) if f.name == "skyeye_requests"]
    assert {s.labels["version"]: s.value for s in family.samples} == {"1": 3.0, "2": 1.0}
