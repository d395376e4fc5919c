"""What a `retrain` run leaves in the Prefect UI (its Artifacts tab): the data version and
its gate, every benchmark against production and the trivial baselines, and the promotion
decision with links to the MLflow runs behind it. The numbers come from `skyeye`; this
module only lays them out."""
from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from skyeye.tracking import runs


def _link(run_id: str | None, text: str | None = None) -> str:
    if not run_id:
        return "none"
    from mlflow.exceptions import MlflowException
    try:
        return f"[{text or run_id}]({runs.run_url(run_id)})"
    except MlflowException:  # a run purged since: name it without a link
        return f"{text or run_id} (run not found)"


def data_artifact(md5: str, validation_run: str) -> None:
    url = runs.run_url(validation_run)
    create_markdown_artifact(key="retrain-data", description="data version and gate", markdown="\n".join([
        "## Data", f"- data version (DVC md5): `{md5}`", "- gate: **passed**",
        f"- validation run: {_link(validation_run)}; Data Docs: [data_docs/index.html]({url}/artifacts/data_docs)"]))


def scoreboard_artifact(version: int, production: int | None) -> list[dict]:
    from skyeye.registry.promotion import scoreboard
    rows = scoreboard(version, production if production != version else None)
    create_table_artifact(key="retrain-benchmarks", table=rows,
                          description=f"version {version} against production ({production or 'none'}) "
                                      "and the trivial baselines, primary metric per benchmark (x100) with 95% "
                                      "intervals; differences paired on the same test items")
    return rows


def promotion_artifact(out: dict, decisions: list[str]) -> None:
    from skyeye.model.references import model_name
    from skyeye.tracking.names import TAG_EVAL_TRAINING_RUN, TAG_INIT_RUN
    client, name = runs.client(), model_name()
    stage2 = client.get_run(out["eval_run"]).data.tags.get(TAG_EVAL_TRAINING_RUN)
    stage1 = client.get_run(stage2).data.tags.get(TAG_INIT_RUN) if stage2 else None
    registered = f"{runs.ui_base()}/#/models/{name}/versions/{out['model_version']}"
    lines = ["## Promotion", f"- registered: [{name} version {out['model_version']}]({registered}), "
                             f"alias reached: **{out['alias']}**",
             f"- tuning job: {_link(out.get('tuning_run'))}; stage 1: {_link(stage1)}; stage 2: {_link(stage2)}",
             f"- evaluation: {_link(out['eval_run'])}",
             "- steps: " + ", ".join(f"{k} {v}" for k, v in out["steps"].items()), "", "### Decision"]
    lines += [f"```\n{d}\n```" for d in decisions]
    create_markdown_artifact(key="retrain-promotion", markdown="\n".join(lines),
                             description="the promotion decision with its reasons")
