"""The serving limits file: what it refuses, named by file and field; which questions earn the
warning of a task the served version is not approved for (no Ray needed)."""
import pytest

from skyeye.serving.config import ServeConfig, load_serve_config


def test_connections_must_leave_room_beyond_the_admitted_chat_requests(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("queue_limit: 64\nmax_connections: 32\n")
    with pytest.raises(ValueError, match=r"(?s)serve\.yaml.*max_connections \(32\) must exceed queue_limit \(64\)"):
        load_serve_config(path)
    assert ServeConfig(queue_limit=64, max_connections=65).max_connections == 65


def test_an_unknown_field_is_named(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("queue_limt: 8\n")
    with pytest.raises(ValueError, match=r"(?s)serve\.yaml.*queue_limt"):
        load_serve_config(path)


def test_which_questions_earn_the_approval_warning():
    from types import SimpleNamespace

    from skyeye.serving.app import SkyEyeServer
    server_class = SkyEyeServer.func_or_class  # the replica's class, without Ray

    def warning(approved: list[str] | None, question: str, version: int | None = 3) -> str | None:
        server = object.__new__(server_class)
        server.engine = SimpleNamespace(lineage={"version": version, "uri": "/models/stage2",
                                                 "approved_tasks": approved})
        return server.unapproved(question)

    assert warning(["caption", "vqa"], "[refer] the white airplane") == (
        "version 3 is not approved for grounding: its acc_at_0.5 is not significantly above the centred_box "
        "baseline on every grounding split (approved for: caption, vqa)")
    for question in ("[identify] {<10><20><30><40>}", "[detection] find every ship", " where is [refer] it"):
        assert "not approved for grounding" in warning(["caption", "vqa"], question)
    for question in ("[vqa] is there a harbour?", "[caption] Briefly describe this image.", "is there a harbour?"):
        assert warning(["caption", "vqa"], question) is None  # approved tasks, and free text (no task)
    assert warning(["grounding"], "[caption] describe it").startswith(
        "version 3 is not approved for caption: its cider is not significantly above the nearest_caption baseline")
    assert warning([], "[vqa] x").endswith("(approved for: no task)")
    # no approval recorded (a model folder, or a version registered before approvals): approved for nothing
    assert warning(None, "[vqa] x", version=None) == (
        "/models/stage2 is not approved for vqa: it carries no approval (no skyeye.approved_tasks tag)")
