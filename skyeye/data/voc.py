"""Reader for DIOR-RSVG: Pascal-VOC XML with a referring expression per object.

Layout (GitHub ZhanYang-nwpu/RSVG-pytorch): `Annotations/*.xml`, `JPEGImages/`, and split
files `train.txt`, `val.txt`, `test.txt` with one integer per line. Each `<object>` is one
sample; the integers index a running count of objects over the XML files sorted by file
name. RSVG is read in this layout too only where SkyEye-Synth wrote it so (data versions up
to 038d42f4); RSVG as released is `skyeye.data.rsvg`.

A box that leaves its image (the XML's `size`) goes by `records.fit_box`: an edge over by
at most max(1 px, 1% of the side) is clipped to the image and counted as clipped; further
out the object is skipped and counted as "box outside the image", with the file, object and
offending field as an example (`Annotations/00004.xml object[0]/bndbox: xmax=4000 > width=800`).
An image all of whose objects are skipped so contributes no sample, as with any other skip.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..formats.benchmarks import SPLITS
from .records import BOX_CLIPPED, BOX_OUTSIDE, Box, DataFormatError, GroundingSample, ReadReport, fit_box

VOC_SPLITS = SPLITS["dior_rsvg"]  # split files train.txt, val.txt, test.txt


@dataclass(frozen=True)
class VocObject:
    name: str
    box: Box  # pixels, (xmin, ymin, xmax, ymax)
    description: str


@dataclass(frozen=True)
class VocAnnotation:
    filename: str | None  # the image file name, when the XML carries one
    size: tuple[int, int]  # (width, height)
    objects: tuple[VocObject, ...]


def _text(elem: ET.Element, tag: str, path: Path, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None:
        raise DataFormatError(path, f"{where}/{tag}", "missing")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(elem, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(path, f"{where}/{tag}", f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataFormatError(path, f"{where}/{tag}", f"not a finite number: {text!r}")
    return value


def parse_annotation(path: Path) -> VocAnnotation:
    """Parse one VOC XML; objects in file order."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataFormatError(path, "(whole file)", f"not valid XML: {e}") from e
    filename = root.findtext("filename")
    size = root.find("size")
    if size is None:
        raise DataFormatError(path, "size", "missing")
    dims = []
    for tag in ("width", "height"):
        value = _number(size, tag, path, "size")
        if not value.is_integer() or value <= 0:
            raise DataFormatError(path, f"size/{tag}", f"not a positive integer: {value}")
        dims.append(int(value))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object[{k}]"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataFormatError(path, f"{where}/bndbox", "missing")
        box = tuple(_number(bndbox, t, path, f"{where}/bndbox") for t in ("xmin", "ymin", "xmax", "ymax"))
        description = obj.findtext("description")
        if description is None:
            raise DataFormatError(path, f"{where}/description", "missing")
        objects.append(VocObject(_text(obj, "name", path, where), box, description.strip()))  # type: ignore[arg-type]
    name = filename.strip() if filename and filename.strip() else None
    return VocAnnotation(name, (dims[0], dims[1]), tuple(objects))


def load_split_indices(folder: Path, n_objects: int | None = None) -> dict[str, list[int]]:
    """The object indices of every split file present in `folder`, checked.

    Each line must be a non-negative integer, listed once in one split only, and below
    `n_objects` when given; a violation is a DataFormatError naming the split file.
    """
    folder = Path(folder)
    result: dict[str, list[int]] = {}
    owner: dict[int, str] = {}  # index -> split file that lists it
    for split in VOC_SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            continue
        indices = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                index = int(line.strip())
            except ValueError:
                raise DataFormatError(path, f"line {lineno}", f"not an integer: {line.strip()!r}") from None
            if index < 0 or (n_objects is not None and index >= n_objects):
                bound = f"0..{n_objects - 1}" if n_objects is not None else ">= 0"
                raise DataFormatError(path, f"line {lineno}", f"object index {index} out of range {bound}")
            if index in owner:
                raise DataFormatError(path, f"line {lineno}", f"object index {index} also listed in {owner[index]}")
            owner[index] = path.name
            indices.append(index)
        result[split] = indices
    if not result:
        raise DataFormatError(folder, "train.txt/val.txt/test.txt", "no split files in this folder")
    return result


def read_voc(
    benchmark: str, root: Path, splits: Sequence[str] | None = None
) -> tuple[list[GroundingSample], ReadReport]:
    """Read the asked splits (default: all whose split files exist); samples by split, then index."""
    flat = _all_objects(root)
    indices = load_split_indices(root, n_objects=len(flat))
    if splits is None:
        splits = tuple(indices)
    for split in splits:
        if split not in indices:
            raise FileNotFoundError(f"{root / (split + '.txt')}: split file not found")
    report = ReadReport(benchmark)
    if unlisted := len(flat) - sum(len(v) for v in indices.values()):
        report.skip("object in no split file", unlisted)
    samples: list[GroundingSample] = []
    for split in splits:
        kept = 0
        for index in sorted(indices[split]):
            xml, ann, k = flat[index]
            sample = _object_sample(benchmark, split, root, xml, ann, k, report)
            if sample is not None:
                samples.append(sample)
                kept += 1
        report.kept[split] += kept
    return samples, report


def _all_objects(root: Path) -> list[tuple[Path, VocAnnotation, int]]:
    """Every object of every XML (file, its annotation, the object's position in it), in the
    order the split files' running index counts them: XML files by name, objects in file order.
    All are parsed whatever the splits asked."""
    xml_files = sorted((root / "Annotations").glob("*.xml"), key=lambda p: p.name)
    if not xml_files:
        raise DataFormatError(root / "Annotations", "*.xml", "no annotation files")
    flat: list[tuple[Path, VocAnnotation, int]] = []
    for xml in xml_files:
        ann = parse_annotation(xml)
        flat.extend((xml, ann, k) for k in range(len(ann.objects)))
    return flat


def _object_sample(benchmark: str, split: str, root: Path, xml: Path, ann: VocAnnotation, k: int,
                   report: ReadReport) -> GroundingSample | None:
    """Object `k` of `xml` as a sample; None, counted in `report` as a skip, when its box is
    degenerate or outside the image, it has no description or its image is missing. A box
    clipped to the image is counted too."""
    obj = ann.objects[k]
    x1, y1, x2, y2 = obj.box
    if not (x1 < x2 and y1 < y2):
        report.skip("degenerate box", split=split)
        return None
    fit = fit_box(obj.box, ann.size)
    where = f"{xml.relative_to(root).as_posix()} object[{k}]/bndbox"
    if fit.status == "outside":
        report.skip(BOX_OUTSIDE, example=f"{where}: {fit.detail}", split=split)
        return None
    if not obj.description:
        report.skip("object without description", split=split)
        return None
    image = _image_path(root, xml, ann)
    if image is None:
        report.skip("missing image file", split=split)
        return None
    if fit.status == "clipped":  # counted once the object is kept
        report.clip(BOX_CLIPPED, example=f"{where}: {fit.detail}")
    return GroundingSample(benchmark, split, f"{xml.stem}_{k}", image, expression=obj.description,
                           box=fit.box or obj.box, image_size=ann.size, category=obj.name)


def _image_path(root: Path, xml: Path, ann: VocAnnotation) -> Path | None:
    """JPEGImages/<filename from the XML>, else JPEGImages/<xml stem>.jpg; None if neither exists."""
    for name in (ann.filename, f"{xml.stem}.jpg"):
        if name and (path := root / "JPEGImages" / name).is_file():
            return path
    return None
