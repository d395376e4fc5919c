"""The house rules, checked: every shipped config loads into its typed model; the layers
import one way (the domain library imports no orchestrator, no module takes a private name
from another package); the top of `skyeye/` holds only the CLI, the config and the
packages; no file cites a document the repository does not hold."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flows.schedule import ScheduleConfig
from skyeye.config import DataConfig, load_yaml_config
from skyeye.model.config import ModelConfig
from skyeye.registry.promotion import PromotionPolicy
from skyeye.serving.config import ServeConfig
from skyeye.training.ablation import AblationConfig
from skyeye.training.stage_config import StageConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "skyeye"
# which typed model each shipped config folder (or file) is read with
CONFIG_MODELS = {"configs/data.yaml": DataConfig, "configs/promotion.yaml": PromotionPolicy,
                 "configs/ablation.yaml": AblationConfig,
                 "configs/serve.yaml": ServeConfig,
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
    if model is StageConfig:  # its name says its stage
        assert path.stem == f"stage{cfg.stage}"


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


def test_the_domain_library_imports_no_orchestrator():
    found = [f"{path.relative_to(REPO)}: {module}" for path in PACKAGE.rglob("*.py")
             for module, _ in _imports(path) if module.split(".")[0] == "prefect"]
    assert found == []


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
