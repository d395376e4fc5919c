"""`skyeye data build`'s sources from its options: `--source NAME=PATH` (a benchmark folder,
or a LLaVA instruction set's `.json` file), `--images [NAME=]DIR` (a LLaVA set's images folder;
NAME may be left out when there is one LLaVA source), `--box-format NAME=FORMAT` and
`--licence NAME=TEXT`. Each refusal names the option and the value (exit 2)."""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from ..config import SOURCE_NAME, SourceConfig
from .console import fail


def _pairs(values: list[str], option: str, form: str, example: str) -> dict[str, str]:
    """{NAME: VALUE} of `option NAME=VALUE` given several times; `form` and `example` for the error."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            fail(f"{option} {v!r}: expected {form}, e.g. {example}")
        if name in out:
            fail(f"{option} {name}: given twice")
        out[name] = rest
    return out


def parse_sources(source: list[str], images: list[str], box_format: list[str], licence: list[str]
                  ) -> dict[str, SourceConfig]:
    paths = _pairs(source, "--source", "NAME=PATH", "rsvqa_hr=/data/RSVQA-HR or geochat=/data/geochat.json")
    llava = [n for n, p in paths.items() if p.lower().endswith(".json")]
    folders: dict[str, str] = {}
    for v in images:
        name, sep, rest = v.partition("=")
        if sep and name.strip() in paths:
            folders[name.strip()] = rest
        elif len(llava) == 1 and llava[0] not in folders:  # one LLaVA source: its folder needs no name
            folders[llava[0]] = v
        else:
            fail(f"--images {v}: say which LLaVA source it is for, --images NAME=DIR "
                 f"(LLaVA sources: {', '.join(llava) or 'none'})")
    formats = _pairs(box_format, "--box-format", "NAME=FORMAT", "geochat=grid100")
    licences = _pairs(licence, "--licence", "NAME=TEXT", "'geochat=CC BY-NC 4.0'")
    for option, given in (("--images", folders), ("--box-format", formats), ("--licence", licences)):
        unknown = [n for n in given if n not in paths]
        if unknown:
            fail(f"{option} {unknown[0]}=...: no --source {unknown[0]}=PATH to apply it to")
    out = {}
    for name, path in paths.items():
        if not SOURCE_NAME.match(name):
            fail(f"--source {name}={path}: a name is lower-case letters, digits, _ and - (a letter first)")
        expanded = Path(path).expanduser()
        if name in llava and not expanded.is_file():
            fail(f"--source {name}={path}: no such file")
        if name not in llava and not expanded.is_dir():
            fail(f"--source {name}={path}: no such folder (a LLaVA set is a .json file)")
        if name in folders and not Path(folders[name]).expanduser().is_dir():
            fail(f"--images {name}={folders[name]}: no such folder")
        spec = {"path": expanded, "licence": licences.get(name)}
        spec |= {"images": Path(folders[name]).expanduser()} if name in folders else {}
        spec |= {"box_format": formats[name]} if name in formats else {}
        try:
            out[name] = SourceConfig(**spec)
        except ValidationError as err:
            options = {"box_format": f"--box-format {name}={formats.get(name)}",
                       "licence": f"--licence {name}={licences.get(name)}"}
            problems = "; ".join(options.get(str(e["loc"][0]) if e["loc"] else "", f"--source {name}={path}") + ": "
                                 + e["msg"].removeprefix("Value error, ") for e in err.errors())
            fail(problems)
    return out
