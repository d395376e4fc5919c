"""The `ablation` flow: the paper's comparison of two-stage tuning with one stage and with one
model per task (`skyeye.training.ablation`), on the data version the retrain flow's data steps
give: data -> backbones -> one task per recipe -> the comparison, under one MLflow parent run.

Thin: each task calls one `skyeye` function. Nothing is cached: an ablation is an experiment
that is rerun to be measured. `python -m flows.ablation [--budget F] [--recipes ...]
[--eval-limit N] [--scale tiny|demo]`.
"""
from __future__ import annotations

import argparse

from skyeye.config import ABLATION_FILE, SCALE_NAMES, configure_environment, get_settings

configure_environment()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from flows.caching import retry_transient  # noqa: E402
from flows.retrain import DEFAULTS, retrain  # noqa: E402

RETRY = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": retry_transient}


@task(name="backbones", cache_policy=NONE, persist_result=False, **RETRY)
def backbones_task(model_config: str, parent_run: str) -> dict:
    from skyeye.training.jobs import prepare_backbones
    return prepare_backbones(get_settings().project_root / model_config, parent_id=parent_run)


@task(name="recipe", cache_policy=NONE, persist_result=False)
def recipe_task(recipe: str, config: dict, backbones: dict, parent_run: str, md5: str) -> dict:
    from skyeye.training.ablation import AblationConfig, plan_for, run_recipe
    cfg = AblationConfig.model_validate(config)
    result = run_recipe(recipe, plan_for(cfg)[recipe], cfg, backbones, parent_run, md5=md5)
    get_run_logger().info("%s: runs %s, %d steps, evaluations %s", recipe, result["stage_runs"], result["steps"],
                          result["eval_runs"])
    return result


@task(name="compare", cache_policy=NONE, persist_result=False, **RETRY)
def compare_task(results: dict, config: dict, parent_run: str) -> dict:
    from skyeye.training.ablation import AblationConfig, log_comparison
    out = log_comparison(parent_run, results, AblationConfig.model_validate(config))
    get_run_logger().info("ablation (MLflow run %s)\n%s", parent_run, out["markdown"])
    return out


def load_configs(config_file: str, budget: float | None, recipes: list[str] | None, eval_limit: int | None,
                 num_workers: int | None):
    """The ablation config with its overrides, and both stage configs it names: a bad value, or a
    stage config naming a test split, is a ValueError naming the file, before any step."""
    from skyeye.training.ablation import load_ablation_config
    from skyeye.training.stage_config import load_stage_config
    root = get_settings().project_root
    cfg = load_ablation_config(root / config_file, budget=budget, recipes=recipes, limit=eval_limit,
                               num_workers=num_workers)
    for stage_file in (cfg.stage1, cfg.stage2):
        load_stage_config(root / stage_file)
    return cfg


@flow(name="ablation", log_prints=True)
def ablation(config_file: str = ABLATION_FILE, budget: float | None = None,
             recipes: list[str] | None = None, eval_limit: int | None = None, scale: str | None = None,
             num_workers: int | None = None, data_config: str = DEFAULTS.data_config) -> dict:
    """The data steps (reused when unchanged), then the backbones, each recipe and the comparison
    under one MLflow parent run; the overrides replace the config file's values."""
    from skyeye.tracking.names import TAG_DVC_MD5
    from skyeye.training.ablation import log_config, plan_for
    from skyeye.training.jobs import tuning_job
    cfg = load_configs(config_file, budget, recipes, eval_limit, num_workers)
    data = retrain(data_config=data_config, scale=scale, train=False)  # the same data version for every recipe
    plan_for(cfg)  # a budget too small for a recipe fails before any compute
    config = cfg.model_dump(mode="json")
    with tuning_job("ablation", tags={TAG_DVC_MD5: data["data_md5"]}) as parent:
        log_config(parent, cfg)
        backbones = backbones_task(cfg.model, parent)
        results = {r: recipe_task.with_options(name=r)(r, config, backbones, parent, data["data_md5"])
                   for r in cfg.recipes}
        out = compare_task(results, config, parent)
    return {"parent_run": parent, "data_md5": data["data_md5"], "results": results} | out


if __name__ == "__main__":
    from skyeye.training.ablation import RECIPES
    parser = argparse.ArgumentParser(description="The paper's ablation: two_stage vs one_stage vs single.")
    parser.add_argument("--config", default=ABLATION_FILE, help="ablation config (relative to the project)")
    parser.add_argument("--budget", type=float, help="scale of the steps budget (default: the config's)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, help="recipes to run (default: the config's)")
    parser.add_argument("--eval-limit", type=int, help="samples per bench split (default: the config's)")
    parser.add_argument("--scale", choices=SCALE_NAMES, help="override the data config's scale")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers per stage (default: the config's)")
    args = parser.parse_args()
    from skyeye.commands.errors import exit_on_error
    with exit_on_error():  # a failure in a line or two, as `skyeye` reports it (SKYEYE_DEBUG=1: the traceback)
        load_configs(args.config, args.budget, args.recipes, args.eval_limit, args.num_workers)  # before Prefect
        print(ablation(config_file=args.config, budget=args.budget, recipes=args.recipes, eval_limit=args.eval_limit,
                       scale=args.scale, num_workers=args.num_workers)["markdown"])
