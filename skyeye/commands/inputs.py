"""Checks of what a command is given, made before it starts anything (a server, Ray, a
flow run, a write): each refusal names the option and the value (`fail`, exit 2)."""
from __future__ import annotations

# imports inside functions: PIL and PyAV load only when an image or a clip is checked, not at `skyeye --help`
import socket
import tempfile
from pathlib import Path

import typer

from .console import fail


def in_range(low: float, high: float | None = None):
    """An option's callback: the value (when given) from `low` to `high`; Typer names the option."""
    def check(value):
        if value is not None and not (low <= value and (high is None or value <= high)):
            raise typer.BadParameter(f"{value} is not {f'in {low}..{high}' if high is not None else f'>= {low}'}")
        return value
    return check


PORT = in_range(1, 65535)


def existing_file(path: Path, option: str) -> Path:
    if not path.exists():
        fail(f"{option} {path}: no such file")
    if path.is_dir():
        fail(f"{option} {path}: is a folder, not a file")
    return path


def existing_folder(path: Path, option: str) -> Path:
    if not path.exists():
        fail(f"{option} {path}: no such folder")
    if not path.is_dir():
        fail(f"{option} {path}: is a file, not a folder")
    return path


def writable_folder(path: Path, option: str) -> Path:
    """A folder the command (re)writes whole: a temporary folder beside it is renamed into place
    (`formats.files.folder_in_place`), so the nearest existing folder above it must be writable."""
    if path.exists() and not path.is_dir():
        fail(f"{option} {path}: is a file, not a folder")
    above = next(p for p in path.resolve().parents if p.exists())
    if not above.is_dir():
        fail(f"{option} {path}: {above} is a file, not a folder")
    try:  # a real write: permissions, a read-only or special file system (root passes os.access)
        tempfile.TemporaryDirectory(dir=above, prefix=".skyeye-write-check-").cleanup()
    except OSError as err:
        fail(f"{option} {path}: cannot write in {above} ({err.strerror or err})")
    return path


def image_file(path: Path, option: str) -> Path:
    """A readable image (or an MP4 clip), checked by decoding its header."""
    existing_file(path, option)
    if path.stat().st_size == 0:
        fail(f"{option} {path}: empty file, not an image")
    try:
        if path.suffix.lower() == ".mp4":
            import av
            with av.open(str(path)) as clip:
                if not clip.streams.video:
                    raise ValueError("no video stream")
        else:
            from PIL import Image
            with Image.open(path) as image:
                image.verify()
    except Exception as err:  # PIL and av raise many kinds for a file that is not theirs
        kind = "an MP4 clip" if path.suffix.lower() == ".mp4" else "an image (PNG, JPEG, TIFF, ...)"
        fail(f"{option} {path}: not {kind} that can be read ({type(err).__name__}: {err})")
    return path


def free_port(host: str, port: int, option: str = "--port") -> None:
    """`host:port` can be listened on here (nothing else holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closing socket is no obstacle
        try:
            s.bind((host, port))
        except OSError as err:
            fail(f"{option} {port}: cannot listen on {host}:{port} ({err.strerror or err})")
