"""Canary and shadow on a real Ray Serve: versions 1 (production) and 2 (staging, the
candidate) of test_serving's project served at once behind the router. A 25% canary
answers a binomially plausible share of 400 requests from the candidate; shadow mode
answers from production only while the candidate answers every copy (its /metrics)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skyeye.serving.config import CanaryConfig
from tests.test_serving import ANSWERS, _messages, _post, served  # noqa: F401 - served: the module's fixture

pytestmark = pytest.mark.slow  # a router and two model deployments on Ray Serve


def _samples(url: str, name: str) -> dict[tuple[str, str, str], float]:
    """A counter of /metrics by (version, role, status) labels."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[(s.labels.get("version"), s.labels.get("role"), s.labels.get("status"))] = s.value
    return out


def _ask(url: str, model: str = "skyeyegpt", max_tokens: int = 3) -> tuple[int, str, str, int, str]:
    """(status, version and role headers, the body's lineage version, the answer)."""
    r = _post(url, {"model": model, "messages": _messages(), "max_tokens": max_tokens})
    body = r.json()
    return (r.status_code, r.headers.get("x-skyeye-version"), r.headers.get("x-skyeye-role"),
            body["skyeye"]["lineage"]["version"], body["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def canary(served):  # noqa: F811 - the fixture imported above
    from skyeye.registry.promotion import promote
    promote(2, "staging", force=True, reason="test: the canary's candidate")
    return served


def test_a_25_percent_canary_answers_a_quarter_from_the_candidate(canary):
    from scipy.stats import binomtest
    deploy, url = canary["deploy"], canary["url"]
    cfg = canary["cfg"].model_copy(update={"queue_limit": 16, "canary": CanaryConfig(mode="canary", canary_percent=25)})
    out = deploy.deploy("1", cfg)
    assert (out.version, out.candidate, out.mode) == (1, 2, "canary")
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "version": 1,
                                                  "candidate": {"version": 2, "role": "candidate"}}
    with ThreadPoolExecutor(8) as pool:  # within the queue limit of each version
        answers = list(pool.map(lambda _: _ask(url), range(400)))
    assert {a[0] for a in answers} == {200}
    assert all((v, role) in {("1", "production"), ("2", "candidate")} and int(v) == lineage
               for _, v, role, lineage, _ in answers)  # the headers name the version that answered
    from_candidate = sum(v == "2" for _, v, *_ in answers)
    test = binomtest(from_candidate, 400, 0.25)
    assert test.pvalue > 0.001, (from_candidate, test)  # inside the 99.9% acceptance region of Bin(400, 1/4)
    requests = _samples(url, "skyeye_requests_total")  # each deployment's own count, in one /metrics
    assert requests[("1", "production", "200")] == 400 - from_candidate
    assert requests[("2", "candidate", "200")] == from_candidate
    routed = _samples(url, "skyeye_routed_requests_total")
    assert routed == {("1", "production", "200"): 400 - from_candidate, ("2", "candidate", "200"): from_candidate}
    # a request naming a version goes to it, whatever the draw
    assert {_ask(url, "skyeyegpt/2", 40)[1:] for _ in range(5)} == {("2", "candidate", 2, ANSWERS[2])}
    assert {_ask(url, "skyeyegpt/1", 40)[1:] for _ in range(5)} == {("1", "production", 1, ANSWERS[1])}


def test_shadow_mode_answers_from_production_while_the_candidate_answers_the_copies(canary):
    deploy, url = canary["deploy"], canary["url"]
    cfg = canary["cfg"].model_copy(update={"queue_limit": 16, "canary": CanaryConfig(mode="shadow")})
    assert deploy.deploy("1", cfg).mode == "shadow"
    before = _samples(url, "skyeye_requests_total").get(("2", "shadow", "200"), 0)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _ask(url, max_tokens=40), range(40)))
    assert set(answers) == {(200, "1", "production", 1, ANSWERS[1])}
    r = _post(url, {"model": "skyeyegpt", "messages": _messages(), "max_tokens": 3})
    assert r.headers["x-skyeye-request-id"] == r.json()["id"]  # the id production's answer and its copy share
    deadline = time.time() + 60
    while True:  # the copies are not awaited on the client's path: they may finish after it
        answered = _samples(url, "skyeye_requests_total").get(("2", "shadow", "200"), 0) - before
        routed = _samples(url, "skyeye_routed_requests_total").get(("2", "shadow", "200"), 0)
        if (answered, routed) == (41, 41) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert (answered, routed) == (41, 41)  # every copy answered by the candidate, counted by the router

    # production moves to the candidate's version: the candidate, now production's own version, gets nothing,
    # and the move rolls without a failed request
    results, stop = [], threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(_ask(url)[:3])
    client = threading.Thread(target=traffic)
    client.start()
    try:
        moved = deploy.deploy("2", cfg)
    finally:
        stop.set()
        client.join(60)
    assert (moved.version, moved.candidate, moved.mode) == (2, 2, "off")
    assert results and {status for status, _, _ in results} == {200}
    assert {v for _, v, _ in results} <= {"1", "2"}
    assert {_ask(url)[1:3] for _ in range(5)} == {("2", "production")}
