"""Reader for RSVG (Sun et al., GeoVG, ACM MM 2022), as its authors' loader reads it.

The authors' loader (GitHub sunyuxi/ReSC, `dataset/data_loader.py`, dataset `rsvg`) reads
`<split_root>/rsvg/rsvg_{train,val,test}.pth` and the images from `<data_root>/rsvg/images/`
(two roots in their code: `data/` and `ln_data/`). SkyEye reads one folder holding both:

    rsvg_train.pth  rsvg_val.pth  rsvg_test.pth   (5,505 / 1,201 / 1,227 pairs)
    images/<img_file>

Each split file is a `torch.save`d list of tuples `(img_file, bbox, phrase, _)`: `bbox` is
integer pixels `[x1, y1, x2, y2]` (the loader takes it as `np.array(bbox, dtype=int)` and
scales x1..y2 straight into the letterboxed image); the fourth element is discarded by the
loader and is not documented, so it is ignored here. The release names no object category,
so the samples carry none (`category=""`).

A split file is a pickle: it is read with `torch.load(weights_only=True)` only, which
rebuilds plain data (lists, tuples, strings, numbers, tensors, and here integer numpy arrays)
and refuses anything else. A file that would import or call anything is refused with a
DataFormatError naming it; it is never executed.

Boxes go by `records.fit_box` against the image's real size (read from the image header),
as for DIOR-RSVG; a missing image is counted, not fatal.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .records import BOX_CLIPPED, BOX_OUTSIDE, DataFormatError, GroundingSample, ReadReport, fit_box

SPLIT_FILES = {split: f"rsvg_{split}.pth" for split in ("train", "val", "test")}
IMAGE_DIR = "images"


def is_rsvg_release(folder: Path) -> bool:
    return any((folder / f).is_file() for f in SPLIT_FILES.values())


def load_split_file(path: Path) -> list:
    """The list a split file holds, loaded as data only; a file that would run code is refused."""
    import numpy as np
    import torch

    # numpy arrays and scalars are data (their reconstruction runs no code): a split file may
    # hold its boxes so, since the loader takes either through np.array
    numpy_data = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar,
                  *(type(np.dtype(t)) for t in ("int32", "int64", "float32", "float64"))]
    try:
        with torch.serialization.safe_globals(numpy_data):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice on loading it unsafely; keep what it refused
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(err))
        reason = f"weights-only load: unsupported {found[1]}" if found else "weights-only load failed"
        raise DataFormatError(path, "(whole file)", "refused: it does not load as plain data with "
                              f"torch.load(weights_only=True), and a split file is never run ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise DataFormatError(path, "(whole file)", f"not a torch.save file: {err}") from None
    if not isinstance(data, list):
        raise DataFormatError(path, "(top level)", f"expected a list of (img_file, bbox, phrase, _), "
                              f"got {type(data).__name__}")
    return data


def read_rsvg(benchmark: str, root: Path, splits: Sequence[str] | None = None
              ) -> tuple[list[GroundingSample], ReadReport]:
    """Read the asked splits (default: every split file present); samples by split, then file order."""
    present = tuple(s for s, f in SPLIT_FILES.items() if (root / f).is_file())
    wanted = tuple(splits) if splits is not None else present
    for split in wanted:
        if split not in present:
            raise FileNotFoundError(f"{root / SPLIT_FILES.get(split, f'rsvg_{split}.pth')}: split file not found")
    report = ReadReport(benchmark)
    sizes: dict[Path, tuple[int, int] | str] = {}  # image -> (width, height), or why it has none
    samples: list[GroundingSample] = []
    for split in wanted:
        path = root / SPLIT_FILES[split]
        kept = 0
        for k, row in enumerate(load_split_file(path)):
            sample = _sample(benchmark, split, root, path, k, row, sizes, report)
            if sample is not None:
                samples.append(sample)
                kept += 1
        report.kept[split] += kept
    return samples, report


def _sample(benchmark: str, split: str, root: Path, path: Path, k: int, row: Any,
            sizes: dict[Path, tuple[int, int] | str], report: ReadReport) -> GroundingSample | None:
    """Tuple `k` of a split file as a sample; None, counted, when it cannot be trained on or scored."""
    where = f"[{k}]"
    if not isinstance(row, (tuple, list)) or len(row) != 4:
        raise DataFormatError(path, where, f"expected a tuple (img_file, bbox, phrase, _), got {_describe(row)}")
    img_file, bbox, phrase, _ = row
    if not isinstance(img_file, str) or not img_file:
        raise DataFormatError(path, f"{where}[0] img_file", f"expected a file name, got {_describe(img_file)}")
    if not isinstance(phrase, str):
        raise DataFormatError(path, f"{where}[2] phrase", f"expected a string, got {_describe(phrase)}")
    box = _box(bbox, path, f"{where}[1] bbox")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        report.skip("degenerate box", example=f"{path.name}{where}: {list(bbox)}", split=split)
        return None
    if not phrase.strip():
        report.skip("pair without phrase", split=split)
        return None
    image = root / IMAGE_DIR / img_file
    if image not in sizes:
        sizes[image] = _image_size(image)
    size = sizes[image]
    if isinstance(size, str):
        report.skip(size, example=f"{IMAGE_DIR}/{img_file} ({path.name}{where})", split=split)
        return None
    fit = fit_box(box, size)
    if fit.status == "outside":
        report.skip(BOX_OUTSIDE, example=f"{path.name}{where} bbox: {fit.detail}", split=split)
        return None
    if fit.status == "clipped":
        report.clip(BOX_CLIPPED, example=f"{path.name}{where} bbox: {fit.detail}")
    return GroundingSample(benchmark, split, f"{Path(img_file).stem}_{k}", image, expression=phrase.strip(),
                           box=fit.box or box, image_size=size)


def _box(bbox: Any, path: Path, field: str) -> tuple[float, float, float, float]:
    """Four integer pixel values (a list, tuple, tensor or numpy array); anything else is an error."""
    values = bbox.tolist() if hasattr(bbox, "tolist") else bbox
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise DataFormatError(path, field, f"expected [x1, y1, x2, y2], got {_describe(bbox)}")
    out = []
    for v in (x.item() if hasattr(x, "item") else x for x in values):  # numpy / tensor scalars
        # integers as released; a float with an integral value is the same pixel
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise DataFormatError(path, field, f"expected integer pixels [x1, y1, x2, y2], got {values}")
        out.append(float(v))
    return out[0], out[1], out[2], out[3]


def _image_size(image: Path) -> tuple[int, int] | str:
    """(width, height) from the image header, or the skip reason."""
    if not image.is_file():
        return "missing image file"
    try:
        with Image.open(image) as im:
            return im.size
    except OSError:
        return "unreadable image file"


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
