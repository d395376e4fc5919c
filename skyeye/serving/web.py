"""The web demo served at `/` (`/ui`) beside the API: upload an image, pick a task (or type
freely), chat, see every predicted box drawn on the image with its phrase, and brush over
a region to ask what is there (`[identify]` with that region's box), as the demos of
MiniGPT-v2 and GeoChat do. Gradio, mounted on the API's FastAPI app.

The demo asks the same `/v1/chat/completions` the API serves (through the server it was
loaded from), so its answers pass the same batching and limits as any client's, and the
same approval: the warning an answer carries (a task the served version is not approved
for) is shown beside it; a refusal is shown as an error.
"""
import base64
import html
import io

import gradio as gr
import httpx
import numpy as np
from PIL import Image

from ..formats.boxes import GRID
from ..model.references import model_name

TASKS = ["refer", "caption", "vqa", "identify", "detection", "free text"]
HINT = {"refer": "the white airplane at the top left", "caption": "Briefly describe this image.",
        "vqa": "how many ships are there?", "identify": "(brush over a region of the image)",
        "detection": "find every airplane in the image", "free text": "[vqa] is there a harbour?"}


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def region_box(layer: Image.Image | None) -> tuple[int, int, int, int] | None:
    """The 0-100 grid box around what the brush painted on a layer (None if nothing)."""
    if layer is None:
        return None
    alpha = np.asarray(layer.convert("RGBA"))[..., 3]
    ys, xs = np.nonzero(alpha)
    if xs.size == 0:
        return None
    w, h = layer.size
    return (int(xs.min() / w * GRID), int(ys.min() / h * GRID), min(GRID, int(xs.max() / w * GRID) + 1),
            min(GRID, int(ys.max() / h * GRID) + 1))


def question(task: str, text: str, box: tuple[int, int, int, int] | None) -> str:
    """The prompt the model is asked: the task identifier, then the text (or the region)."""
    if task == "identify" or (box is not None and not text.strip()):
        if box is None:
            raise gr.Error("brush over a region of the image first, then ask [identify]")
        return "[identify] {<%d><%d><%d><%d>}" % box
    if task == "free text":
        return text.strip()
    if not text.strip():
        raise gr.Error(f"type what to ask, e.g. {HINT[task]}")
    return f"[{task}] {text.strip()}"


def _text_of(content) -> str:
    """A chat message's text, whether Gradio hands it over as a string or as parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts).strip()


def _ask(editor: dict | None, task: str, text: str, api_key: str, chat: list, request: gr.Request):
    if not editor or editor.get("background") is None:
        raise gr.Error("upload an image first")
    image = editor["background"].convert("RGB")
    layers = editor.get("layers") or []
    region = region_box(layers[0]) if layers else None
    prompt = question(task, text, region)
    messages, turn = [], [{"type": "image_url", "image_url": {"url": _data_url(image)}}]
    for m in chat:  # the conversation so far; the image goes with the first question
        if m["role"] == "user":
            messages.append({"role": "user", "content": turn + [{"type": "text", "text": _text_of(m["content"])}]})
            turn = []
        else:
            messages.append({"role": "assistant", "content": _text_of(m["content"])})
    messages.append({"role": "user", "content": turn + [{"type": "text", "text": prompt}]})
    url = f"{request.request.url.scheme}://{request.request.url.netloc}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(url, json={"model": model_name(), "messages": messages, "max_tokens": 64}, headers=headers,
                   timeout=120)
    body = r.json()
    if r.status_code != 200:
        raise gr.Error(body.get("error", {}).get("message", r.text[:200]))
    answer = body["choices"][0]["message"]["content"]
    boxes = [(tuple(int(round(v)) for v in b["pixels"]), b["phrase"] or prompt) for b in body["skyeye"]["boxes"]]
    if prompt.startswith("[identify]") and region:  # the region asked about, named by the answer
        w, h = image.size
        boxes.append(((region[0] * w // GRID, region[1] * h // GRID, region[2] * w // GRID, region[3] * h // GRID),
                      answer))
    chat = chat + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    lineage = body["skyeye"]["lineage"]
    warning = body["skyeye"].get("warning")
    shown = f'<p style="color:#b45309"><b>Warning:</b> {html.escape(warning)}</p>' if warning else ""
    return (image, boxes), chat, f"{lineage['model']} version {lineage.get('version')}: {answer}", shown


def build() -> gr.Blocks:
    with gr.Blocks(title="SkyEyeGPT") as demo:
        gr.Markdown("## SkyEyeGPT\nAsk about an aerial or satellite image. Boxes the model answers are drawn "
                    "on the right; brush over a region and ask `identify` to learn what is there.")
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(type="pil", label="image", elem_id="skyeye-image", layers=False,
                                        transforms=(), sources=("upload", "clipboard"),
                                        brush=gr.Brush(colors=["#ff3030"], default_size=12))
                task = gr.Dropdown(TASKS, value="refer", label="task", elem_id="skyeye-task")
                text = gr.Textbox(label="question", placeholder=HINT["refer"], elem_id="skyeye-question")
                api_key = gr.Textbox(label="API key (when the server asks for one)", type="password")
                ask = gr.Button("Ask", variant="primary", elem_id="skyeye-ask")
            with gr.Column():
                drawn = gr.AnnotatedImage(label="boxes", elem_id="skyeye-boxes")
                answer = gr.Textbox(label="answer", elem_id="skyeye-answer", interactive=False)
                warning = gr.HTML(elem_id="skyeye-warning")  # a task the served version is not approved for
                chat = gr.Chatbot(label="conversation", elem_id="skyeye-chat", height=260)
        task.change(lambda t: gr.update(placeholder=HINT[t]), task, text)
        # a new image, a new conversation
        editor.upload(lambda: ([], None, "", ""), None, [chat, drawn, answer, warning])
        ask.click(_ask, [editor, task, text, api_key, chat], [drawn, chat, answer, warning])
    return demo


def mount(app) -> None:
    """The demo at `/ui` of the API's app (`/` redirects there)."""
    gr.mount_gradio_app(app, build(), path="/ui", footer_links=[])
