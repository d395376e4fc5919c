"""The `skyeye` command as a user runs it: data steps, clear errors, the gate's exit code."""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from skyeye.cli import app

runner = CliRunner()


def test_help_explains_each_data_command():
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    for cmd in ("synth", "build", "version", "history", "checkout", "validate", "inspect"):
        assert cmd in result.output


def test_synth_build_validate_then_a_defect_fails_the_gate(tmp_path):
    synth, out = tmp_path / "synth", tmp_path / "instructions"
    r = runner.invoke(app, ["data", "synth", "--out", str(synth), "--scale", "tiny", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "rsvqa_hr" in r.output and "test_phili=3" in r.output
    r = runner.invoke(app, ["data", "build", "--root", str(synth), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "inactive question" in r.output  # skipped rows are reported
    r = runner.invoke(app, ["data", "validate", "--data", str(out), "--no-record"])
    assert r.exit_code == 0, r.output
    # A truncated image in the training set must fail the gate and be named.
    stage1 = json.loads((out / "stage1.json").read_text())
    victim = out / stage1[0]["image"]
    victim.write_bytes(victim.read_bytes()[:200])
    r = runner.invoke(app, ["data", "validate", "--data", str(out), "--no-record"])
    assert r.exit_code == 1
    assert victim.name in r.output and "FAILED" in r.output


def test_bad_source_option_is_refused(tmp_path):
    r = runner.invoke(app, ["data", "build", "--root", str(tmp_path), "--source", "rsvqa_hr"])
    assert r.exit_code == 2 and "expected NAME=PATH" in r.output


def test_malformed_native_file_names_file_and_field(tiny_synth, tmp_path):
    folder = tmp_path / "ucm_captions"
    shutil.copytree(tiny_synth / "ucm_captions", folder)
    data = json.loads((folder / "dataset.json").read_text())
    del data["images"][2]["filename"]
    (folder / "dataset.json").write_text(json.dumps(data))
    r = runner.invoke(app, ["data", "inspect", str(folder)])
    assert r.exit_code == 2
    assert "dataset.json" in r.output and "filename" in r.output


def test_inspect_reports_kept_and_skipped(tiny_synth):
    r = runner.invoke(app, ["data", "inspect", str(tiny_synth / "rsvqa_lr")])
    assert r.exit_code == 0
    assert "kept" in r.output and "inactive question" in r.output


def test_help_shows_task_identifiers_as_written():
    """Help texts name task identifiers such as [refer]; a markup renderer would swallow them."""
    result = runner.invoke(app, ["chat", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # the terminal width wraps lines
    assert "[refer] the white airplane at the top left" in text and "[vqa]" in text
    assert "models:/skyeyegpt@production" in text  # the model it asks by default
