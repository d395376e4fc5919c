"""`skyeye ablation`: the paper's comparison of two-stage tuning with one stage and with one model
per task, on the data already built (`skyeye.training.ablation`; flows/ablation.py runs the
same with the data steps first)."""
from __future__ import annotations

# imports inside functions: training.ablation brings MLflow: loaded when the command runs, not at `skyeye --help`
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import ABLATION_FILE
from .console import fail, say
from .inputs import in_range


def ablation(
    config: Annotated[Path, typer.Option(help="Ablation config (defaults when the file does not exist).")]
    = Path(ABLATION_FILE),
    budget: Annotated[Optional[float], typer.Option(
        help="Scale of the budget: (stage1.max_steps + stage2.max_steps) x this, steps per recipe.")] = None,
    recipes: Annotated[Optional[str], typer.Option(
        help="Comma list of two_stage, one_stage, single (default: the config's).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(
        callback=in_range(1), help="At most N samples per bench split.")] = None,
    num_workers: Annotated[Optional[int], typer.Option(callback=in_range(1), help="Ray Train workers per stage.")
                           ] = None,
    local: Annotated[Optional[bool], typer.Option("--local", help="Train in this process, no Ray.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison rows as JSON.")] = False,
) -> None:
    """Train two_stage, one_stage and single (one model per task) on the same data, backbones and
    number of optimizer steps; print each bench split's primary metric per recipe with 95%
    bootstrap intervals and which differences are significant (one MLflow parent run)."""
    from ..training.ablation import load_ablation_config, run_ablation
    try:
        cfg = load_ablation_config(config, budget=budget, limit=eval_limit, num_workers=num_workers, local=local,
                                   recipes=[r.strip() for r in recipes.split(",") if r.strip()] if recipes else None)
        out = run_ablation(cfg)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    say(json.dumps(out["rows"], indent=1) if json_out else f"ablation: MLflow run {out['parent_run']}\n"
                                                           f"{out['markdown']}")
