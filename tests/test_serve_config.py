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


def test_a_request_without_max_tokens_gets_the_served_models_own_budget():
    """The serve default is the model's max_new_tokens (its config), not a second number: a model
    whose config says 37 answers in 37 tokens unless the request or configs/serve.yaml says otherwise."""
    import base64
    import io

    from PIL import Image

    from skyeye.model.config import ModelConfig
    from skyeye.serving.app import SkyEyeServer
    from skyeye.serving.engine import Engine
    from skyeye.serving.protocol import ChatCompletionRequest

    class Model:  # what the engine reads of a loaded SkyEyeGPT here
        def __init__(self, cfg: ModelConfig):
            self.cfg = cfg

        def eval(self):
            return self

        def prompt_length(self, *_):
            return 10

        def context_length(self):
            return 512

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}

    def budget(model_cfg: ModelConfig, serve_cfg: ServeConfig, max_tokens: int | None = None) -> int:
        server = object.__new__(SkyEyeServer.func_or_class)
        server.engine, server.config, server.served = Engine(Model(model_cfg), {}), serve_cfg, {"skyeyegpt"}
        body = ChatCompletionRequest(model="skyeyegpt", max_tokens=max_tokens, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "[vqa] is there a harbour?"}]}])
        return server._conversation(body).max_tokens

    assert ServeConfig().default_max_tokens is None and load_serve_config().default_max_tokens is None
    assert budget(ModelConfig(), ServeConfig()) == ModelConfig().max_new_tokens
    assert budget(ModelConfig(max_new_tokens=37), ServeConfig()) == 37
    assert budget(ModelConfig(max_new_tokens=37), ServeConfig(default_max_tokens=12)) == 12  # serve.yaml says
    assert budget(ModelConfig(max_new_tokens=37), ServeConfig(), max_tokens=5) == 5  # the request says
    assert budget(ModelConfig(max_new_tokens=999), ServeConfig(max_tokens_limit=64)) == 64  # never past the limit
