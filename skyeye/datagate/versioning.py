"""Data versions with DVC: `data.dvc` at the repository top level tracks `data/`.

The committed `.dvc/config` names a local folder remote, `local` -> `<root>/.dvc-storage`
(stored relative to `.dvc/`, so clones work). `SKYEYE_DVC_REMOTE_URL` puts a remote named
`override` into the git-ignored `.dvc/config.local` and makes it the default there, so any
DVC remote works without touching committed files.

DVC runs in-process through `dvc.repo.Repo` and `dvc.api` (no subprocess start-up per
command; its exceptions are turned into `VersioningError`s naming the path or revision).
Git runs as `git` subprocesses. Every function takes `root`, the repository root.
"""
from __future__ import annotations

# imports inside functions: DVC (about a second to import) loads only in the functions that talk to it
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Settings, get_settings
from ..formats.files import atomic_write_text
from ..formats.licences import summary as licence_summary

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

DVC_FILE = "data.dvc"
CARD_PATH = "data/instructions/card.json"
LOCAL_REMOTE = "local"
OVERRIDE_REMOTE = "override"
STORAGE_DIR = ".dvc-storage"
# DVC's own set-up files; committed with the first data version so that old revisions
# can be read back (DVC needs the remote named in the committed config).
DVC_SETUP_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")


class VersioningError(RuntimeError):
    """A versioning step failed; the message names the path or revision at fault."""


Diff = list[tuple[str, Any, Any]]


@dataclass
class VersionReport:
    md5: str
    changed: bool
    previous_md5: str | None
    git_rev: str | None
    counts: dict[str, Any]
    diff: Diff
    remote: str | None = None
    pushed: int = 0
    note: str | None = None

    def render(self) -> str:
        if not self.changed:
            return f"data unchanged: {self.md5}" + (f" (commit {self.git_rev[:12]})" if self.git_rev else "")
        lines = [f"data version {self.md5} ({'was ' + self.previous_md5 if self.previous_md5 else 'new'})",
                 f"committed as {self.git_rev[:12]}" if self.git_rev
                 else "not committed (data.dvc changed in the working tree)",
                 f"pushed {self.pushed} file(s) to remote '{self.remote}'"]
        if self.note:
            lines.append(f"note: {self.note}")
        if self.diff:
            lines.append(_table(["count", "old", "new"], [[k, _fmt(o), _fmt(n)] for k, o, n in self.diff]))
        else:
            lines.append("card.json counts unchanged")
        return "\n".join(lines)


@dataclass
class DataVersion:
    md5: str
    git_rev: str | None  # last commit touching data.dvc; for checkout_data, the revision restored
    dirty: bool  # data.dvc differs from HEAD
    nfiles: int | None = None
    size: int | None = None
    note: str | None = None

    def render(self) -> str:
        where = f"commit {self.git_rev[:12]}" if self.git_rev else "no commit"
        text = f"data {self.md5} ({self.nfiles} files, {self.size} bytes) at {where}"
        text += ", data.dvc has uncommitted changes" if self.dirty else ""
        return text + (f"\n{self.note}" if self.note else "")


@dataclass
class HistoryEntry:
    rev: str
    short_rev: str
    date: str
    message: str
    md5: str | None
    stage1: int | None = None
    stage2: int | None = None
    eval_total: int | None = None
    validation: str = "not validated"
    note: str | None = None
    counts: dict[str, Any] = field(default_factory=dict, repr=False)
    licences: dict[str, str] | None = None  # its card's sources -> licence; None: a card without them


# ---------------------------------------------------------------- helpers

def _root(root: Path | None) -> Path:
    return Path(root or get_settings().project_root).resolve()


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise VersioningError("git is not installed or not on PATH") from exc
    if check and out.returncode != 0:
        raise VersioningError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip() or out.stdout.strip()}")
    return out


@contextmanager
def _quiet_dvc(root: Path, what: str) -> Iterator[None]:
    """Silence DVC's INFO lines (hints for CLI users, e.g. "git add data.dvc") and turn its
    exceptions into VersioningErrors that say what we were doing, and where."""
    from dvc.exceptions import DvcException

    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    except DvcException as exc:
        raise VersioningError(f"{what} failed in {root}: {exc}") from exc
    finally:
        log.setLevel(level)


@contextmanager
def _dvc(root: Path, what: str) -> Iterator[Any]:
    """The DVC repo at root, opened quietly (see _quiet_dvc)."""
    from dvc.repo import Repo

    with _quiet_dvc(root, what), Repo(str(root)) as repo:
        yield repo


def parse_dvc_file(text: str, where: str) -> dict[str, Any]:
    try:
        out = (yaml.safe_load(text) or {})["outs"][0]
        if not out.get("md5"):
            raise KeyError("md5")
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise VersioningError(f"{where} is not a valid DVC file (no outs[0].md5)") from exc
    return out


def dvc_file_at(root: Path, rev: str) -> str | None:
    """Text of data.dvc at a git revision, None if that revision has none (or no commits)."""
    out = git(root, "show", f"{rev}:./{DVC_FILE}", check=False)  # ./ : relative to root, not the git top
    return out.stdout if out.returncode == 0 else None


def flatten_counts(card: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"stage1": {"total": 3}} -> {"stage1.total": 3}; numbers only."""
    flat: dict[str, Any] = {}
    for key, value in card.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_counts(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def diff_counts(old: dict[str, Any], new: dict[str, Any]) -> Diff:
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _missing_from_cache(repo: Any, md5: str) -> bool:
    """Whether the local cache lacks the .dir listing or any file of a version."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    odb = repo.cache.local
    try:
        tree = Tree.load(odb, HashInfo("md5", md5))
    except Exception:  # absent or unreadable listing: treat as missing and fetch
        return True
    return any(not odb.exists(hi.value) for _, _, hi in tree)


def _read_card(root: Path, rev: str, remotes: list[str | None]) -> tuple[dict[str, Any] | None, str | None]:
    """card.json at a git revision via DVC (cache, else each remote in turn)."""
    import dvc.api

    errors = []
    for remote in remotes:
        try:
            return json.loads(dvc.api.read(CARD_PATH, repo=str(root), rev=rev, remote=remote)), None
        except FileNotFoundError:
            return None, f"no {CARD_PATH} in this version"
        except json.JSONDecodeError as exc:
            return None, f"{CARD_PATH} is not valid JSON: {exc}"
        except Exception as exc:  # DVC raises several types for 'not in cache/remote'
            errors.append(f"{remote or 'default'}: {type(exc).__name__}")
    return None, f"{CARD_PATH} not in the cache or remotes ({'; '.join(errors)})"


def _remote_order(repo: Any) -> list[str | None]:
    default = repo.config["core"].get("remote")
    return [None, *(name for name in repo.config["remote"] if name != default)]


# ---------------------------------------------------------------- public API

def ensure_dvc(root: Path | None = None) -> None:
    """`dvc init` if needed; fill in the committed local remote only where missing (so a
    second call changes nothing); apply or drop the override remote in config.local."""
    root = _root(root)
    top = git(root, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise VersioningError(f"{root} is not inside a git repository; run `git init` first")
    if not (root / ".dvc").is_dir():
        from dvc.repo import Repo

        with _quiet_dvc(root, "dvc init"):
            Repo.init(str(root), subdir=Path(top.stdout.strip()).resolve() != root).close()

    from dvc.config_schema import RelPath

    storage = root / STORAGE_DIR
    url = Settings(project_root=root).dvc_remote_url  # fresh: the env var is read now
    with _dvc(root, "configuring DVC remotes") as repo:
        committed = repo.config.read("repo")
        if LOCAL_REMOTE not in committed["remote"] or not committed["core"].get("remote"):
            with repo.config.edit("repo") as conf:
                # RelPath: DVC stores it relative to .dvc/ ("../.dvc-storage").
                conf["remote"].setdefault(LOCAL_REMOTE, {"url": RelPath(str(storage))})
                conf["core"].setdefault("remote", LOCAL_REMOTE)
        local = repo.config.read("local")
        if url:
            if "://" not in url and not os.path.isabs(url):
                url = str((root / url).resolve())  # a relative path means relative to the repo
            current = (local["remote"].get(OVERRIDE_REMOTE, {}).get("url"), local["core"].get("remote"))
            if current != (url, OVERRIDE_REMOTE):
                with repo.config.edit("local") as conf:
                    conf["remote"][OVERRIDE_REMOTE] = {"url": url}
                    conf["core"]["remote"] = OVERRIDE_REMOTE
        elif OVERRIDE_REMOTE in local["remote"] or local["core"].get("remote") == OVERRIDE_REMOTE:
            # The env var was unset since: follow it, back to the committed default.
            with repo.config.edit("local") as conf:
                conf["remote"].pop(OVERRIDE_REMOTE, None)
                if conf["core"].get("remote") == OVERRIDE_REMOTE:
                    del conf["core"]["remote"]
        repo.scm.ignore(str(storage))  # no-op when already ignored


def version_data(root: Path | None = None, data_dir: Path | None = None, *,
                 commit: bool = False, message: str | None = None) -> VersionReport:
    """`dvc add data` + `dvc push`, compared with data.dvc at HEAD; optionally commit."""
    root = _root(root)
    data = Path(data_dir).resolve() if data_dir else root / "data"
    if data != root / "data":
        raise VersioningError(f"{DVC_FILE} tracks {root / 'data'}; cannot version {data}")
    if not data.is_dir():
        raise VersioningError(f"data folder {data} does not exist")
    ensure_dvc(root)

    old_text = dvc_file_at(root, "HEAD")
    previous_md5 = parse_dvc_file(old_text, f"{DVC_FILE} at HEAD")["md5"] if old_text else None
    with _dvc(root, f"dvc add {data}") as repo:
        repo.add(str(data))
    md5 = parse_dvc_file((root / DVC_FILE).read_text(), str(root / DVC_FILE))["md5"]
    with _dvc(root, "dvc push of data.dvc") as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            raise VersioningError(f"no default DVC remote in {root}/.dvc/config")
        pushed = repo.push(targets=[str(root / DVC_FILE)])
        remotes = _remote_order(repo)

    card_file = root / CARD_PATH
    try:
        counts = flatten_counts(json.loads(card_file.read_text())) if card_file.exists() else {}
    except json.JSONDecodeError as exc:
        raise VersioningError(f"{card_file} is not valid JSON: {exc}") from exc
    note = None if card_file.exists() else f"no {CARD_PATH}"
    changed = md5 != previous_md5
    old_counts: dict[str, Any] = {}
    if changed and previous_md5:
        old_card, note_old = _read_card(root, "HEAD", remotes)
        old_counts = flatten_counts(old_card) if old_card else {}
        note = note or (f"previous version: {note_old}" if note_old else None)
    diff = diff_counts(old_counts, counts) if changed else []

    git_rev = None
    if changed and commit:
        status = git(root, "status", "--porcelain", "--", *DVC_SETUP_FILES).stdout
        pending = {line[3:] for line in status.splitlines()}
        paths = [p for p in (DVC_FILE, ".gitignore") if (root / p).exists()]
        paths += [p for p in DVC_SETUP_FILES if p in pending]
        git(root, "add", "--", *paths)
        git(root, "commit", "-q", "-m", message or f"data: version {md5}", "--only", "--", *paths)
        git_rev = git(root, "rev-parse", "HEAD").stdout.strip()
    elif not changed:
        git_rev = _last_commit(root)
    return VersionReport(md5, changed, previous_md5, git_rev, counts, diff, remote, pushed, note)


def _last_commit(root: Path) -> str | None:
    out = git(root, "log", "-1", "--format=%H", "--", DVC_FILE, check=False)
    return out.stdout.strip() or None


def current_version(root: Path | None = None) -> DataVersion | None:
    """The version data.dvc in the working tree records; None if there is no data.dvc."""
    root = _root(root)
    path = root / DVC_FILE
    if not path.exists():
        return None
    out = parse_dvc_file(path.read_text(), str(path))
    dirty = bool(git(root, "status", "--porcelain", "--", DVC_FILE).stdout.strip())
    return DataVersion(out["md5"], _last_commit(root), dirty, out.get("nfiles"), out.get("size"))


def history(root: Path | None = None, validation_lookup: Callable[[str], str | None] | None = None,
            limit: int = 50) -> list[HistoryEntry]:
    """One entry per commit that changed data.dvc, newest first."""
    root = _root(root)
    if git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode != 0:
        return []  # no commits yet
    log = git(root, "log", f"-n{limit}", "--format=%H%x1f%h%x1f%cI%x1f%s", "--", DVC_FILE)
    with _dvc(root, "listing remotes") as repo:
        remotes = _remote_order(repo)
    cards: dict[str, tuple[dict[str, Any] | None, str | None]] = {}  # md5 -> card: reverts reuse it
    entries = []
    for line in log.stdout.splitlines():
        rev, short, date, message = line.split("\x1f", 3)
        text = dvc_file_at(root, rev)
        entry = HistoryEntry(rev, short, date, message, None)
        if text is None:
            entry.note = "data.dvc removed in this commit"
            entries.append(entry)
            continue
        entry.md5 = parse_dvc_file(text, f"{DVC_FILE} at {short}")["md5"]
        if entry.md5 not in cards:
            cards[entry.md5] = _read_card(root, rev, remotes)
        card, entry.note = cards[entry.md5]
        if card:
            entry.counts = flatten_counts(card)
            entry.stage1 = (card.get("stage1") or {}).get("total")
            entry.stage2 = (card.get("stage2") or {}).get("total")
            evals = card.get("eval") or {}
            entry.eval_total = sum(v for v in evals.values() if isinstance(v, int)) if evals else None
            entry.licences = card.get("licences") if isinstance(card.get("licences"), dict) else None
        if validation_lookup:
            try:
                entry.validation = validation_lookup(entry.md5) or "not validated"
            except Exception as exc:  # a tracking-server hiccup must not hide the history
                entry.validation = f"lookup failed: {exc}"
        entries.append(entry)
    return entries


def render_history(entries: list[HistoryEntry]) -> str:
    if not entries:
        return "no data versions (no commit has changed data.dvc)"
    rows = [[e.short_rev, e.date[:16].replace("T", " "), (e.md5 or "-")[:12], _fmt(e.stage1), _fmt(e.stage2),
             _fmt(e.eval_total), e.validation, licence_summary(e.licences),
             e.message[:50] + (f"  [{e.note}]" if e.note else "")]
            for e in entries]
    return _table(["rev", "date", "md5", "stage1", "stage2", "eval", "validation", "licences", "message"], rows)


def checkout_data(root: Path | None = None, rev: str = "HEAD", *, force: bool = False) -> DataVersion:
    """Restore data/ (and data.dvc) to the version data.dvc records at git revision `rev`,
    fetching from the remote what the cache lacks. Without `force`, DVC refuses to drop
    edits in data/ that were never versioned; nothing is changed then."""
    root = _root(root)
    sha, text = _dvc_file_at_revision(root, rev)
    target = parse_dvc_file(text, f"{DVC_FILE} at {rev}")
    path = root / DVC_FILE
    current = path.read_text() if path.exists() else None

    with _dvc(root, f"checkout of data at '{rev}'") as repo:
        remote = repo.config["core"].get("remote")
        if current:
            _refill_cache(repo, root, parse_dvc_file(current, str(path))["md5"])
        atomic_write_text(path, text)
        try:
            fetched = _fetch_version(repo, root, target["md5"], rev, remote)
            changes = _dvc_checkout(repo, root, rev, force)
        except BaseException:
            # Put data.dvc back so it still describes data/ (DVC checks before it writes).
            if current is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_text(path, current)
            raise
    stats = changes.get("stats", {})
    source = f"{fetched} file(s) fetched from remote '{remote}'" if fetched else "from the local cache"
    dirty = bool(git(root, "status", "--porcelain", "--", DVC_FILE).stdout.strip())
    note = (f"restored data/ to {target['md5']} from revision {rev} ({sha[:12]}), {source}; "
            f"{stats.get('added', 0)} added, {stats.get('modified', 0)} modified, {stats.get('deleted', 0)} deleted")
    return DataVersion(target["md5"], sha, dirty, target.get("nfiles"), target.get("size"), note)


def _dvc_file_at_revision(root: Path, rev: str) -> tuple[str, str]:
    """The commit `rev` names and the text of its data.dvc."""
    resolved = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if resolved.returncode != 0:
        raise VersioningError(f"unknown git revision '{rev}' in {root}")
    sha = resolved.stdout.strip()
    text = dvc_file_at(root, sha)
    if text is None:
        raise VersioningError(f"revision '{rev}' ({sha[:12]}) has no {DVC_FILE}")
    return sha, text


def _refill_cache(repo: Any, root: Path, md5: str) -> None:
    """Refill the cache with the version we leave (if the workspace holds it), so DVC's
    "unsaved files" guard only trips on edits that really were never versioned."""
    if _missing_from_cache(repo, md5):
        try:
            repo.fetch(targets=[str(root / DVC_FILE)])
        except Exception:  # best effort: the guard in _dvc_checkout still protects the workspace
            pass


def _fetch_version(repo: Any, root: Path, md5: str, rev: str, remote: str | None) -> int:
    """Fetch the version data.dvc now names, unless the cache holds it; the files fetched."""
    if not _missing_from_cache(repo, md5):
        return 0
    fetched = repo.fetch(targets=[str(root / DVC_FILE)])
    if _missing_from_cache(repo, md5):
        raise VersioningError(f"data of revision '{rev}' ({md5}) is neither in the "
                              f"cache nor on remote '{remote}'; data/ left unchanged")
    return fetched


def _dvc_checkout(repo: Any, root: Path, rev: str, force: bool) -> dict[str, Any]:
    """DVC's checkout of data.dvc; its changes. Without `force`, DVC first refuses to delete
    workspace files its cache lacks (edits never versioned). DVC 3 raises that refusal as a
    bare DvcException, with no subclass of its own (dvc/repo/checkout.py, _check_can_delete),
    while its other checkout failures have theirs (CheckoutError, CheckoutErrorSuggestGit,
    LockError...); an output's own guard raises ConfirmRemoveError. Those types, not the
    message's text, say it was the refusal."""
    from dvc.exceptions import ConfirmRemoveError, DvcException

    try:
        return repo.checkout(targets=[str(root / DVC_FILE)], force=force)
    except DvcException as exc:
        if force or not (type(exc) is DvcException or isinstance(exc, ConfirmRemoveError)):
            raise
        raise VersioningError(f"checkout of data at '{rev}' would discard edits in data/ that were "
                              f"never versioned: {exc}\n(version them first, or pass force=True)") from exc
