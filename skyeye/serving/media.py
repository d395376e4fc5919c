"""Images as requests send them: a `data:` URL holding base64 PNG, JPEG or TIFF bytes, or a
file under the one folder the server was started with (as vLLM's
`--allowed-local-media-path`). Remote URLs are refused: the server never fetches on a
client's behalf. The pixel count is read from the header and checked before any decoding,
so a small file that would decode to a huge image (a decompression bomb) is refused."""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from .protocol import APIError

FORMATS = {"PNG", "JPEG", "TIFF"}
MIME = {"image/png", "image/jpeg", "image/jpg", "image/tiff"}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_image")


def _data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    mime, _, encoding = header.removeprefix("data:").partition(";")
    if not sep or encoding != "base64":
        raise _bad(param, "a data URL must be data:<image type>;base64,<bytes>")
    if mime.lower() not in MIME:
        raise _bad(param, f"image type {mime or '(none)'} is not served; send PNG, JPEG or TIFF")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(param, "the data URL's payload is not valid base64") from None


def _local_file(url: str, param: str, allowed: Path | None) -> bytes:
    path = Path(unquote(urlparse(url).path)) if url.startswith("file:") else Path(url)
    if allowed is None:
        raise _bad(param, "this server takes images as data URLs only (no local media folder is configured)")
    root = Path(allowed).resolve()
    target = (root / path if not path.is_absolute() else path).resolve()
    if root != target and root not in target.parents:
        raise _bad(param, f"{url}: outside the server's media folder")
    if not target.is_file():
        raise _bad(param, f"{url}: no such file in the server's media folder")
    return target.read_bytes()


def load_image(url: str, param: str, *, max_pixels: int, allowed: Path | None = None) -> Image.Image:
    """The RGB image `url` names, or an APIError (400) naming `param`."""
    text = url.strip()
    if text.startswith("data:"):
        raw = _data_url(text, param)
    elif "://" in text and not text.startswith("file:"):
        raise _bad(param, "remote image URLs are refused (the server never fetches on a client's behalf); "
                          "send the image as a data URL")
    else:
        raw = _local_file(text, param, allowed)
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own guard, far above ours
        raise _bad(param, f"the image is over the limit of {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for bytes that are no image
        raise _bad(param, "the bytes are not a PNG, JPEG or TIFF image") from None
    if image.format not in FORMATS:
        raise _bad(param, f"{image.format} images are not served; send PNG, JPEG or TIFF")
    width, height = image.size
    if width * height > max_pixels:
        raise _bad(param, f"the image is {width} x {height} pixels, over the limit of {max_pixels}")
    try:
        image.load()
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - a truncated or corrupt image
        raise _bad(param, "the image does not decode (truncated or corrupt)") from None
