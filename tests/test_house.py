"""The house rules, checked: every shipped config loads into its typed model; the layers
import one way (the domain library reaches no orchestrator, not even through another
module; its packages, and the modules inside each, import each other without a cycle; no
module takes a private name from another package); the top of `skyeye/` holds only the
CLI, the config and the packages; no file cites a document the repository does not hold.
The import checks read every import of a file, those inside functions too, and are run
on a small planted package as well, so that a check which cannot fail would show."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flows.schedule import ScheduleConfig
from skyeye.config import DataConfig, load_yaml_config
from skyeye.model.config import ModelConfig
from skyeye.monitoring.config import MonitorConfig
from skyeye.registry.promotion import PromotionPolicy
from skyeye.serving.config import ServeConfig
from skyeye.training.ablation import AblationConfig
from skyeye.training.stage_config import StageConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "skyeye"
# which typed model each shipped config folder (or file) is read with
CONFIG_MODELS = {"configs/data.yaml": DataConfig, "configs/promotion.yaml": PromotionPolicy,
                 "configs/ablation.yaml": AblationConfig,
                 "configs/serve.yaml": ServeConfig, "configs/monitor.yaml": MonitorConfig,
                 "configs/schedule.yaml": ScheduleConfig, "configs/model": ModelConfig, "configs/train": StageConfig}


def _model_of(path: Path):
    rel = path.relative_to(REPO).as_posix()
    return CONFIG_MODELS.get(rel) or CONFIG_MODELS.get(path.parent.relative_to(REPO).as_posix())


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_config_loads_into_its_typed_model(path):
    model = _model_of(path)
    assert model is not None, f"{path}: no typed model is known for this config; add it to CONFIG_MODELS"
    cfg = load_yaml_config(path, model)
    assert isinstance(cfg, model)
    if model is StageConfig:  # its name says its stage (stageN, or stageN_<variant>)
        assert path.stem == f"stage{cfg.stage}" or path.stem.startswith(f"stage{cfg.stage}_")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names) of every `from ... import ...` in a module of the package."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(REPO).with_suffix("").parts  # ("skyeye", "registry", "store")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = list(here[:len(here) - node.level]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _package_of(module: str) -> str:
    """`skyeye.registry.store` -> `skyeye.registry`; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def test_no_module_takes_a_private_name_from_another_package():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        mine = _package_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        for module, names in _imports(path):
            if not module.startswith("skyeye"):
                continue
            private = [n for n in names if n.startswith("_")]
            if private and _package_of(module) != mine:
                offences.append(f"{path.relative_to(REPO)}: {private} from {module}")
            if any(part.startswith("_") and part != "__init__" for part in module.split(".")):
                offences.append(f"{path.relative_to(REPO)}: imports the private module {module}")
    assert offences == []


# ---- the import graph: every import of every file, inside functions too --------------------

ORCHESTRATION = ("flows", "prefect")  # the Prefect side, and Prefect itself
LOCAL_PACKAGES = ("skyeye", "flows", "infra", "bench", "tests")  # what the graph follows in this repository


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Each module of the `packages` under `root` -> what it imports: a module of the graph where
    the import names one (`from x import y` names x.y when that is a module, else x), otherwise
    the name as written (`prefect`, `torch.nn`)."""
    files = {_module_name(p, root): p for name in packages
             for p in ([root / f"{name}.py"] if (root / f"{name}.py").is_file() else (root / name).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets |= {f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names}
        graph[module] = targets
    return graph


def reached_orchestration(graph: dict[str, set[str]], package: str,
                          forbidden: tuple[str, ...] = ORCHESTRATION) -> list[str]:
    """Each import chain from a module of `package` to a `forbidden` name, through the modules of
    the graph (any package): `a -> b -> prefect`."""
    chains = set()
    for start in (m for m in graph if m.split(".")[0] == package):
        seen, queue = {start: [start]}, [start]
        while queue:
            module = queue.pop(0)
            for target in sorted(graph.get(module, ())):
                if target.split(".")[0] in forbidden:
                    chains.add(" -> ".join([*seen[module], target]))
                elif target in graph and target not in seen:
                    seen[target] = [*seen[module], target]
                    queue.append(target)
    # the shortest chain to each offending import is enough
    best: dict[str, str] = {}
    for chain in sorted(chains, key=len):
        best.setdefault(chain.rsplit(" -> ", 2)[-2] + " -> " + chain.rsplit(" -> ", 1)[-1], chain)
    return sorted(best.values())


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                out.append(sorted([v, *component]))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _subpackage(module: str) -> str:
    """`skyeye.evaluation.runner` -> `skyeye.evaluation`; `skyeye.cli` and `skyeye` stay as they are."""
    return ".".join(module.split(".")[:2])


def package_cycles(graph: dict[str, set[str]], package: str) -> list[str]:
    """The cycles between the subpackages of `package`, each with one import per edge of it."""
    edges: dict[str, set[str]] = {}
    witness: dict[tuple[str, str], str] = {}
    for module, targets in graph.items():
        for target in targets:
            a, b = _subpackage(module), _subpackage(target)
            if module.split(".")[0] == package and target in graph and target.split(".")[0] == package and a != b:
                edges.setdefault(a, set()).add(b)
                witness.setdefault((a, b), f"{module} imports {target}")
    return [" <-> ".join(c) + ": " + "; ".join(witness[a, b] for a in c for b in c if (a, b) in witness)
            for c in _cycles(edges)]


def module_cycles(graph: dict[str, set[str]], package: str) -> list[str]:
    """The cycles between the modules of `package`."""
    mine = {m for m in graph if m.split(".")[0] == package}
    return [" <-> ".join(c) for c in _cycles({m: graph[m] & mine for m in mine})]


def test_the_domain_library_reaches_no_orchestrator():
    assert reached_orchestration(import_graph(REPO, LOCAL_PACKAGES), "skyeye") == []


def test_the_packages_import_each_other_without_a_cycle():
    graph = import_graph(REPO, LOCAL_PACKAGES)
    assert package_cycles(graph, "skyeye") == []
    assert module_cycles(graph, "skyeye") == []


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_planted_orchestrator_import_is_found_through_other_modules(tmp_path):
    root = _plant(tmp_path, {
        "lib/__init__.py": "",
        "lib/cli.py": "from .core import engine\n",
        "lib/core/__init__.py": "",
        "lib/core/engine.py": "def later():\n    import helper  # inside a function\n",
        "lib/core/clean.py": "import os\n",
        "lib/jobs.py": "from orch.flow import go\n",  # the orchestration package itself
        "helper.py": "def later():\n    import prefect\n",  # a module outside the package
        "orch/__init__.py": "", "orch/flow.py": "import prefect\n"})
    found = reached_orchestration(import_graph(root, ("lib", "orch", "helper")), "lib", ("orch", "prefect"))
    # one chain per offending import, the shortest (lib.cli -> lib.core.engine -> ... is the same one)
    assert found == ["lib.core.engine -> helper -> prefect", "lib.jobs -> orch.flow"]
    assert reached_orchestration(import_graph(root, ("lib", "orch", "helper")), "orch", ("nothing",)) == []


def test_a_planted_cycle_is_found_between_packages_and_between_modules(tmp_path):
    root = _plant(tmp_path, {
        "lib/__init__.py": "",
        "lib/a/__init__.py": "", "lib/a/one.py": "def f():\n    from lib.b import two\n",
        "lib/b/__init__.py": "", "lib/b/two.py": "import os\n", "lib/b/three.py": "from ..a.four import x\n",
        "lib/a/four.py": "x = 1\n",
        "lib/c/__init__.py": "", "lib/c/x.py": "from . import y\n", "lib/c/y.py": "def g():\n    from .x import f\n"})
    graph = import_graph(root, ("lib",))
    assert package_cycles(graph, "lib") == [
        "lib.a <-> lib.b: lib.a.one imports lib.b.two; lib.b.three imports lib.a.four"]
    assert module_cycles(graph, "lib") == ["lib.c.x <-> lib.c.y"]  # no module cycle between a and b
    (root / "lib/b/three.py").write_text("x = 2\n")
    assert package_cycles(import_graph(root, ("lib",)), "lib") == []


def test_the_top_of_the_package_holds_only_the_cli_the_config_and_packages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "cli.py", "config.py"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert packages and all((PACKAGE / p / "__init__.py").is_file() for p in packages)


def _tracked_text_files() -> list[Path]:
    import subprocess
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [REPO / f for f in out.splitlines()]
    return [f for f in files if f.suffix in {".md", ".py", ".yaml", ".toml", ".txt", ""} and f.is_file()
            and "tests/data" not in f.as_posix()]


def test_no_file_cites_a_document_the_repository_does_not_hold():
    """Markdown links to local files and mentions of `docs/...` pages must resolve;
    documents outside the repository (a sibling shared folder, say) are never cited."""
    missing = []
    for path in _tracked_text_files():
        text = path.read_text(errors="ignore")
        if re.search(r"\.\./shared/|shared/reference", text) and path.name != "test_house.py":
            missing.append(f"{path.relative_to(REPO)} cites a document outside the repository")
        targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if path.suffix == ".md" else []
        targets += re.findall(r"\b(docs/[\w./-]+\.(?:md|png))", text)
        for target in targets:
            if "://" in target or target.startswith("mailto:"):
                continue
            base = REPO if target.startswith("docs/") else path.parent
            if not (base / target).exists():
                missing.append(f"{path.relative_to(REPO)} -> {target}")
    assert missing == []
