"""skyeye.datagate.versioning against real git and real DVC, one throw-away repository per test."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from skyeye.datagate.versioning import (
    VersioningError,
    checkout_data,
    current_version,
    ensure_dvc,
    history,
    render_history,
    version_data,
)

CARD = {"stage1": {"total": 3, "by_task": {"caption": 2, "vqa": 1}, "by_source": {"rsvg": 3}},
        "stage2": {"total": 1}, "eval": {"rsvg_test": 5, "rsicd_test": 2},
        "synth": {"rsvg": {"test": 4}}}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def write_card(root: Path, card: dict) -> None:
    (root / "data/instructions/card.json").write_text(json.dumps(card))


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Keep DVC's global/site state out of the user's home and /var/tmp.
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.delenv("SKYEYE_DVC_REMOTE_URL", raising=False)
    root = tmp_path / "repo"
    (root / "data/instructions").mkdir(parents=True)
    (root / "data/synth").mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "commit.gpgsign", "false")
    write_card(root, CARD)
    (root / "data/instructions/stage1.json").write_text('[{"id": "s1-0"}]')
    (root / "data/synth/a.txt").write_text("first\n")
    ensure_dvc(root)
    return root


def commits(root: Path) -> int:
    return int(git(root, "rev-list", "--count", "HEAD").strip())


def test_ensure_dvc_is_idempotent(repo: Path) -> None:
    config = (repo / ".dvc/config").read_text()
    assert "../.dvc-storage" in config and "remote = local" in config
    before = git(repo, "status", "--porcelain")
    ensure_dvc(repo)
    assert git(repo, "status", "--porcelain") == before
    assert (repo / ".dvc/config").read_text() == config


def test_version_commit_diff_and_unchanged(repo: Path) -> None:
    first = version_data(repo, commit=True, message="data v1")
    assert first.changed and first.previous_md5 is None and first.md5.endswith(".dir")
    assert first.git_rev == git(repo, "rev-parse", "HEAD").strip()
    assert ("stage1.total", None, 3) in first.diff  # everything is new
    assert first.counts["eval.rsvg_test"] == 5
    assert "data/" not in git(repo, "ls-files")  # data itself is not in git
    assert list((repo / ".dvc-storage").rglob("*.dir"))

    again = version_data(repo, commit=True, message="nothing")
    assert not again.changed and again.diff == [] and again.md5 == first.md5
    assert commits(repo) == 1 and again.git_rev == first.git_rev
    assert again.render().startswith(f"data unchanged: {first.md5}")

    write_card(repo, {**CARD, "stage1": {**CARD["stage1"], "total": 4}})
    second = version_data(repo, commit=True, message="data v2")
    assert second.changed and second.md5 != first.md5 and second.previous_md5 == first.md5
    assert second.diff == [("stage1.total", 3, 4)]
    assert commits(repo) == 2 and git(repo, "log", "-1", "--format=%s").strip() == "data v2"
    assert "stage1.total" in second.render()
    cur = current_version(repo)
    assert cur and cur.md5 == second.md5 and cur.git_rev == second.git_rev and not cur.dirty


def test_history_and_checkout(repo: Path) -> None:
    first = version_data(repo, commit=True, message="data v1")
    original = (repo / "data/synth/a.txt").read_bytes()
    (repo / "data/synth/a.txt").write_text("second\n")
    write_card(repo, {**CARD, "stage2": {"total": 7}, "licences": {"geochat": "CC BY-NC 4.0", "rsvg": "unknown"}})
    second = version_data(repo, commit=True, message="data v2")

    outcomes = {first.md5: "passed (run abc)"}
    entries = history(repo, validation_lookup=outcomes.get)
    assert [e.md5 for e in entries] == [second.md5, first.md5]
    assert [e.message for e in entries] == ["data v2", "data v1"]
    assert (entries[0].stage1, entries[0].stage2, entries[0].eval_total) == (3, 7, 7)
    assert entries[1].stage2 == 1
    assert entries[0].validation == "not validated" and entries[1].validation == "passed (run abc)"
    assert "passed (run abc)" in render_history(entries)
    assert entries[0].licences == {"geochat": "CC BY-NC 4.0", "rsvg": "unknown"} and entries[1].licences is None
    table = render_history(entries).splitlines()
    assert "CC BY-NC 4.0; unknown" in table[2] and "not recorded" in table[3]  # a card built before licences

    restored = checkout_data(repo, first.git_rev)
    assert (repo / "data/synth/a.txt").read_bytes() == original
    assert restored.md5 == first.md5 and restored.dirty  # data.dvc now differs from HEAD
    assert current_version(repo).md5 == first.md5

    # Without a cache the data must come back from the local remote.
    checkout_data(repo, "HEAD")
    shutil.rmtree(repo / ".dvc/cache")
    restored = checkout_data(repo, first.git_rev)
    assert (repo / "data/synth/a.txt").read_bytes() == original
    assert json.loads((repo / "data/instructions/card.json").read_text())["stage2"]["total"] == 1
    assert "fetched" in restored.note

    # History still finds the counts once the cache is gone (read from the remote).
    shutil.rmtree(repo / ".dvc/cache")
    assert history(repo)[1].stage1 == 3


def test_checkout_refuses_to_drop_unversioned_edits(repo: Path) -> None:
    first = version_data(repo, commit=True, message="v1")
    (repo / "data/synth/a.txt").write_text("edited, never versioned\n")
    version_data(repo, commit=True, message="v2")
    (repo / "data/synth/new.txt").write_text("unsaved\n")
    with pytest.raises(VersioningError, match="never versioned"):
        checkout_data(repo, first.git_rev)
    assert (repo / "data/synth/new.txt").exists()
    assert not current_version(repo).dirty  # data.dvc put back
    checkout_data(repo, first.git_rev, force=True)
    assert not (repo / "data/synth/new.txt").exists()


def test_override_remote(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared-remote"
    monkeypatch.setenv("SKYEYE_DVC_REMOTE_URL", str(shared))
    before = git(repo, "status", "--porcelain")
    ensure_dvc(repo)
    assert git(repo, "status", "--porcelain") == before  # only the git-ignored config.local changes
    assert "override" in (repo / ".dvc/config.local").read_text()
    report = version_data(repo, commit=True)
    assert report.remote == "override"
    assert list(shared.rglob("*.dir")) and not (repo / ".dvc-storage").exists()

    monkeypatch.delenv("SKYEYE_DVC_REMOTE_URL")
    ensure_dvc(repo)  # back to the committed remote
    assert "override" not in (repo / ".dvc/config.local").read_text()


def test_errors_name_the_revision(repo: Path) -> None:
    version_data(repo, commit=True, message="v1")
    with pytest.raises(VersioningError, match="unknown git revision 'no-such-rev'"):
        checkout_data(repo, "no-such-rev")

    # Data that is in neither the cache nor the remote: refused, workspace untouched.
    (repo / "data/synth/a.txt").write_text("v2\n")
    version_data(repo, commit=True, message="v2")
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / ".dvc-storage")
    with pytest.raises(VersioningError, match="'HEAD~1'.*neither in the cache nor on remote 'local'"):
        checkout_data(repo, "HEAD~1")
    assert (repo / "data/synth/a.txt").read_text() == "v2\n" and not current_version(repo).dirty

    git(repo, "checkout", "-q", "--orphan", "other")
    git(repo, "rm", "-rq", "--cached", ".")
    git(repo, "commit", "-q", "--allow-empty", "-m", "empty")
    empty = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(VersioningError, match=f"revision '{empty}'.*has no data.dvc"):
        checkout_data(repo, empty)

    shutil.rmtree(repo / "data")
    with pytest.raises(VersioningError, match="data folder .*/data does not exist"):
        version_data(repo)
