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


@pytest.fixture(scope="session")
def fresh_instructions(tmp_path_factory) -> Path:
    """The tiny corpus and its instructions again with another seed: new images of the same world."""
    from skyeye.data.instructions import build
    from skyeye.synth.corpus import synthesize
    root = tmp_path_factory.mktemp("fresh") / "synth"
    synthesize(root, scale="tiny", seed=1, workers=1, progress=False)
    build(root, root.parent / "instructions")
    return root.parent / "instructions"


@pytest.fixture(scope="session")
def tiny_backbones(tiny_instructions: Path, tmp_path_factory) -> dict[str, str]:
    """Random dim-64 backbones (HF ViT, LLaMA-architecture LM) and a BPE tokenizer trained on
    the tiny instructions: what the backbones step produces, minus the pretraining."""
    import torch

    from skyeye.model.tiny import TinyLLMSpec, TinyVisionSpec, save_random_backbones
    from skyeye.model.tokenizer import instruction_texts, train_tokenizer
    out = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)  # the same weights whichever test asks first: the drift tests' p-values repeat
    tok = train_tokenizer(instruction_texts([tiny_instructions / "stage1.json"]), out / "tok", 400)
    paths = save_random_backbones(out, tok, TinyVisionSpec(image_size=64, patch_size=16, hidden_size=64, layers=2,
                                                           heads=2),
                                  TinyLLMSpec(hidden_size=64, layers=2, heads=2, intermediate_size=128))
    return paths | {"tokenizer": paths["llm"]}


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server (SQLite) for the tests that run flows in this process: its start,
    a fresh database migrated (about 20 s here), is paid once a session, not once a test.
    Prefect reads its settings once per process, so results go where they went before."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield
