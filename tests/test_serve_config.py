"""The serving limits file: what it refuses, named by file and field (no Ray needed)."""
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
