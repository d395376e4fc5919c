"""Shared fixtures: one tiny SkyEye-Synth corpus and its instructions per test session,
and an isolated environment (no writes to the user's home or the project's state)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Commits made by tests (throw-away repositories) need an identity on a fresh machine.
for key, value in {"GIT_AUTHOR_NAME": "SkyEye tests", "GIT_AUTHOR_EMAIL": "tests@skyeye.local",
                   "GIT_COMMITTER_NAME": "SkyEye tests", "GIT_COMMITTER_EMAIL": "tests@skyeye.local"}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    from skyeye.synth.corpus import synthesize
    root = tmp_path_factory.mktemp("corpus") / "synth"
    synthesize(root, scale="tiny", seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_instructions(tiny_synth: Path) -> Path:
    from skyeye.data.instructions import build
    out = tiny_synth.parent / "instructions"
    build(tiny_synth, out)
    return out
