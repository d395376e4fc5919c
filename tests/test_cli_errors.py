"""Bad input to every `skyeye` command, as a new user gives it: each is answered in a few lines
naming the option and the value (exit 2 for a wrong input, 1 for a failure), with no traceback,
nothing started (Ray, Prefect's temporary server) and nothing written. An unexpected error is
one "internal error" line naming the log that holds its traceback; SKYEYE_DEBUG=1 shows it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app  # the whole `skyeye` command: the library's commands and the orchestration ones
from tests.processes import free_port
from tests.projects import REPO, enter_project, write_project

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "project")
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.new("RGB", (32, 32), (30, 120, 60)).save(root / "scene.png")
    (root / "broken.yaml").write_text("stage: [1\n")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield from enter_project(root, monkeypatch)  # which also resets MLflow's tracking URI after


def files(root: Path) -> dict[str, bytes]:
    """Every file of the project but git's, with its bytes: what a command may not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts}


def assert_refused(output: str, code: int, expected_code: int, *named: str) -> None:
    assert code == expected_code, output
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) <= 4, output
    for text in named:
        assert text in output, (text, output)


# (arguments, exit status, what the answer must name); {root} is the project folder
BAD = [
    # chat --image: missing, not an image, empty, a folder, corrupt bytes; then an unknown model
    (["chat", "--image", "nope.png", "[caption] hi"], 2, ["--image", "nope.png", "no such file"]),
    (["chat", "--image", "notes.txt", "[caption] hi"], 2, ["--image", "notes.txt", "not an image"]),
    (["chat", "--image", "empty.png", "[caption] hi"], 2, ["--image", "empty.png", "empty"]),
    (["chat", "--image", "configs", "[caption] hi"], 2, ["--image", "configs", "folder"]),
    (["chat", "--image", "corrupt.png", "[caption] hi"], 2, ["--image", "corrupt.png", "not an image"]),
    (["chat", "--image", "scene.png", "--model", "models:/skyeyegpt@canary", "[vqa] hi"], 2, ["--model", "canary"]),
    # output folders: under a file, a file itself
    (["data", "synth", "--scale", "tiny", "--out", "notes.txt/synth"], 2, ["--out", "notes.txt/synth", "not a folder"]),
    (["data", "synth", "--scale", "tiny", "--out", "notes.txt"], 2, ["--out", "notes.txt", "not a folder"]),
    (["data", "build", "--root", "configs", "--out", "notes.txt/out"], 2, ["--out", "notes.txt/out"]),
    # values out of range or unknown
    (["data", "synth", "--scale", "huge", "--out", "synth"], 2, ["--scale", "huge", "tiny"]),
    (["data", "synth", "--workers", "0", "--out", "synth"], 2, ["--workers", "0"]),
    (["data", "history", "--limit", "0"], 2, ["--limit", "0"]),
    (["train", "--stage", "3"], 2, ["--stage", "3"]),
    (["train", "--stage", "1", "--model", "configs/model/test.yaml", "--config", "configs/stage1.yaml",
      "--num-workers", "0"], 2, ["--num-workers", "0"]),
    (["evaluate", "--model", "x", "--limit", "0"], 2, ["--limit", "0"]),
    (["evaluate", "--model", "x", "--num-workers", "0"], 2, ["--num-workers 0"]),
    (["ablation", "--eval-limit", "0"], 2, ["--eval-limit", "0"]),
    (["server", "up", "--prefect-port", "70000"], 2, ["--prefect-port", "70000"]),
    (["promote", "--version", "1", "--to", "canary"], 2, ["canary"]),
    # missing files and folders
    (["data", "build", "--root", "nowhere"], 2, ["--root", "nowhere", "no such folder"]),
    (["data", "build", "--root", "configs", "--source", "rsvqa_hr=/nowhere/rsvqa"], 2,
     ["--source rsvqa_hr=/nowhere/rsvqa", "no such folder"]),
    (["data", "inspect", "nowhere"], 2, ["nowhere", "no such folder"]),
    (["data", "validate", "--data", "nowhere", "--no-record"], 2, ["--data", "nowhere"]),
    (["backbones", "--model", "configs/model/nope.yaml"], 2, ["--model", "nope.yaml", "no such file"]),
    (["train", "--stage", "1", "--model", "configs/model/test.yaml", "--config", "nope.yaml"], 2,
     ["--config", "nope.yaml"]),
    (["evaluate", "--model", "x", "--data", "nowhere"], 2, ["--data", "nowhere"]),
    (["register", "--eval-run", "abc", "--model-dir", "nowhere"], 2, ["--model-dir", "nowhere"]),
    # corrupt configs, configs that do not fit
    (["backbones", "--model", "broken.yaml"], 2, ["broken.yaml", "YAML"]),
    (["train", "--stage", "1", "--model", "configs/model/test.yaml", "--config", "broken.yaml"], 2,
     ["broken.yaml", "YAML"]),
    (["train", "--stage", "1", "--model", "configs/model/test.yaml", "--config", "configs/stage2.yaml"], 2,
     ["--config", "stage2.yaml", "stage-2"]),
    (["train", "--stage", "2", "--model", "configs/model/test.yaml", "--config", "configs/stage2.yaml"], 2,
     ["--init", "stage 2"]),
    (["ablation", "--config", "broken.yaml"], 2, ["broken.yaml"]),
    # unknown references
    (["train", "--stage", "2", "--model", "configs/model/test.yaml", "--config", "configs/stage2.yaml",
      "--init", "no-such-run"], 2, ["--init", "no-such-run"]),
    (["models", "99"], 2, ["skyeyegpt"]),
    (["audit", "--model", "99"], 2, ["skyeyegpt"]),
    (["audit", "--model", "1", "--data", "abc"], 2, ["--model", "--data"]),
    (["promote", "--version", "99", "--to", "staging"], 2, ["skyeyegpt"]),
    (["data", "checkout", "no-such-rev"], 2, ["no-such-rev"]),
    (["rollback", "--alias", "canary"], 2, ["canary"]),
    # a server that is not there
    (["schedule", "status"], 2, ["PREFECT_API_URL", "skyeye server up"]),
]


@pytest.mark.parametrize("args,code,named", BAD, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input_is_refused_in_a_few_lines(project, args, code, named):
    before = files(project)
    r = runner.invoke(app, args)
    assert_refused(r.output, r.exit_code, code, *named)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert files(project).keys() <= before.keys() | {"mlruns/mlflow.db"}  # a registry lookup opens the store
    assert all(files(project)[name] == data for name, data in before.items() if name != "mlruns/mlflow.db")
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_an_unwritable_output_folder_is_named(project):
    """/proc refuses new folders even to root (CI runs as root, so a chmod-ed folder would not do)."""
    out = "/proc/skyeye-synth"
    r = runner.invoke(app, ["data", "synth", "--scale", "tiny", "--out", out])
    assert_refused(r.output, r.exit_code, 2, "--out", out, "cannot write")
    assert not Path(out).exists()


def test_an_unexpected_error_is_one_line_with_its_log(project, monkeypatch):
    import skyeye.registry.store as store

    def broken():
        raise KeyError("stage2_model")
    monkeypatch.setattr(store, "list_versions", broken)
    r = runner.invoke(app, ["models"])
    assert_refused(r.output, r.exit_code, 1, "internal error", "KeyError", "SKYEYE_DEBUG=1")
    log = next((project / ".skyeye/logs").glob("error-*.log"))
    assert str(log) in " ".join(r.output.split()) and "Traceback" in log.read_text() and "broken" in log.read_text()


def skyeye(project: Path, *args: str, env: dict | None = None, module: str = "flows.cli"
           ) -> subprocess.CompletedProcess:
    """The command as a user runs it: a new process in the project, Ray's files under the project."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SKYEYE_", "RAY_", "PREFECT_"))}
    clean |= {"SKYEYE_PROJECT_ROOT": str(project), "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(project / "ray")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=project, env=clean | (env or {}),
                          capture_output=True, text=True, timeout=180)


def nothing_started(project: Path, out: subprocess.CompletedProcess) -> bool:
    """No Ray session (RAY_TMPDIR) and no Prefect temporary server (its database, its log line)."""
    return (not (project / "ray").exists() and not (project / ".skyeye/prefect/prefect.db").exists()
            and "temporary server" not in out.stdout + out.stderr)


@pytest.mark.parametrize("args,named", [
    (["--port", "70000"], ["--port", "70000", "65535"]),
    (["--port", "0"], ["--port", "0"]),
    (["--model", "models:/skyeyegpt/99", "--port", "{free}"], ["--model", "skyeyegpt", "99"]),
    (["--model", "models:/other@production", "--port", "{free}"], ["--model", "other"]),
    (["--port", "{free}"], ["--model", "skyeyegpt"]),  # no production model yet
    (["--canary", "25", "--shadow", "--port", "{free}"], ["--canary", "--shadow", "choose one"]),
    (["--canary", "0", "--port", "{free}"], ["--canary", "0"]),
], ids=["port-too-high", "port-zero", "unknown-version", "other-model", "no-production", "canary-and-shadow",
        "canary-zero"])
def test_serve_refuses_before_starting_prefect_or_ray(project, args, named):
    out = skyeye(project, "serve", *(a.format(free=free_port()) for a in args))
    assert_refused(out.stderr, out.returncode, 2, *named)
    assert nothing_started(project, out), out.stdout + out.stderr


def test_serve_refuses_a_port_in_use(project):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        out = skyeye(project, "serve", "--host", "127.0.0.1", "--port", port)
    assert_refused(out.stderr, out.returncode, 2, "--port", port, "cannot listen")
    assert nothing_started(project, out), out.stdout + out.stderr


def test_flows_report_a_bad_config_in_a_line_before_starting(project):
    stage1 = ["--model-config", "configs/model/test.yaml", "--stage1-config", "broken.yaml"]
    for module, args, named in (("flows.retrain", ["--data-config", "nope.yaml"], "nope.yaml"),
                                ("flows.retrain", stage1, "broken.yaml"),
                                ("flows.ablation", ["--config", "broken.yaml"], "broken.yaml")):
        out = skyeye(project, *args, module=module)
        assert_refused(out.stderr, out.returncode, 2, named)
        assert nothing_started(project, out), out.stdout + out.stderr


def test_debug_shows_the_traceback(project):
    args = ["train", "--stage", "1", "--model", "configs/model/test.yaml", "--config", "broken.yaml"]
    quiet = skyeye(project, *args)
    assert_refused(quiet.stderr, quiet.returncode, 2, "broken.yaml")
    for loud in (skyeye(project, *args, env={"SKYEYE_DEBUG": "1"}), skyeye(project, "--debug", *args)):
        assert loud.returncode == 1 and "Traceback" in loud.stderr and "broken.yaml" in loud.stderr


def test_help_says_how_to_get_the_traceback():
    r = runner.invoke(app, ["--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "--debug" in text and "SKYEYE_DEBUG=1" in text
