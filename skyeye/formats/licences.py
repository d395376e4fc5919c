"""Licences in the lineage: each source's licence or terms, as the data card records them
(`card.json` -> `licences`: source -> licence), carried to the data gate's run, every
training and evaluation run and every registered version (tag `skyeye.data.licences`,
`tracking.names.TAG_DATA_LICENCES`), and checked by the promotion policy's
`licences: {forbid: [...]}`. Free of torch and MLflow.

A licence is the text its release states ("CC BY-NC 4.0", "research use only"), or
`unknown` when SkyEye found none; matching a forbidden licence ignores case and spaces
around it, nothing else: a policy names the exact texts it forbids.
"""
from __future__ import annotations

import json
from pathlib import Path

from .benchmarks import BENCHMARKS

UNKNOWN = "unknown"
# SkyEye-Synth is drawn by this project's code, from no third-party data: it carries the
# project's own terms (the repository declares no licence of its own: no LICENSE file, none in
# pyproject.toml), whatever a benchmark it imitates is released under
SYNTH_LICENCE = "SkyEye-Synth: generated, the SkyEye project's terms"
# The benchmarks as released, where the release states terms. None of the eight is recorded as
# stating any in what SkyEye was built from (CapERA's repository has no licence file and its readme
# states no terms; RSVG's loader repository is MIT, which covers its code, not the data), so all are
# `unknown` until someone who holds the release declares its terms with the source (`licence:`).
RELEASED_LICENCE: dict[str, str] = {name: UNKNOWN for name in BENCHMARKS}
SYNTH_MARKER = "SKYEYE_SYNTH.md"  # the file `skyeye data synth` writes at the top of its corpus
CARD_FILE = "card.json"


def benchmark_licence(name: str, folder: Path, declared: str | None = None) -> str:
    """A benchmark folder's licence: as declared with the source, SkyEye-Synth's when the folder
    is part of a synthetic corpus, else its release's."""
    if declared:
        return declared.strip()
    if (Path(folder).parent / SYNTH_MARKER).is_file() or (Path(folder) / SYNTH_MARKER).is_file():
        return SYNTH_LICENCE
    return RELEASED_LICENCE.get(name, UNKNOWN)


def card_licences(instructions: Path | str) -> dict[str, str] | None:
    """source -> licence from the data card in an instruction folder; None when the card has
    none (a data version built before licences were recorded) or there is no card."""
    try:
        card = json.loads((Path(instructions) / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = card.get("licences") if isinstance(card, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def forbidden(licences: dict[str, str], forbid: list[str]) -> list[tuple[str, str]]:
    """(source, licence) of every source whose licence is in `forbid`."""
    banned = {f.strip().lower() for f in forbid}
    return [(src, lic) for src, lic in sorted(licences.items()) if lic.strip().lower() in banned]


def summary(licences: dict[str, str] | None) -> str:
    """The distinct licences, for a table cell; `not recorded` when there are none."""
    if not licences:
        return "not recorded"
    return "; ".join(sorted(set(licences.values())))


def lines(licences: dict[str, str] | None) -> list[str]:
    """One `source: licence` per source, for a report."""
    return [f"{src}: {lic}" for src, lic in sorted((licences or {}).items())]
