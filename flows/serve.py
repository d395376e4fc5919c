"""The `serve` flow: a registered SkyEyeGPT version (default: production) deployed on Ray
Serve (the cluster RAY_ADDRESS names, or this process's local Ray), checked with a health
probe and a real question about a test image, and recorded on the version.

Thin: each task calls one `skyeye.serving.deploy` function. `skyeye serve` runs this flow,
then keeps a local server in the foreground (following the production alias); run it
directly with `python -m flows.serve [--model models:/skyeyegpt/3]`.
"""
from __future__ import annotations

import argparse
import os

from skyeye.config import configure_environment

configure_environment()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402

from skyeye.serving import deploy  # noqa: E402
from skyeye.serving.config import ServeConfig, load_serve_config  # noqa: E402


def serve_config(host: str | None = None, port: int | None = None, canary: dict | None = None) -> ServeConfig:
    """configs/serve.yaml with this run's host, port and canary settings (`canary:` fields)."""
    cfg = load_serve_config()
    data = cfg.model_dump() | {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    data["canary"] = data["canary"] | (canary or {})
    return ServeConfig.model_validate(data)


@task(name="deploy")
def deploy_task(model: str | None, host: str | None, port: int | None, canary: dict | None = None) -> dict:
    cfg = serve_config(host, port, canary)
    deploy.connect(cfg)
    done = deploy.deploy(model, cfg)
    logger = get_run_logger()
    logger.info("version %d deployed at %s (replacing %s)", done.version, done.url, done.replaced or "none")
    if done.candidate:
        logger.info("candidate version %d beside it (%s)", done.candidate, done.mode)
    return {"version": done.version, "uri": done.uri, "url": done.url, "replaced": done.replaced,
            "api_key_env": cfg.api_key_env, "candidate": done.candidate, "mode": done.mode}


@task(name="verify")
def verify_task(deployed: dict) -> str:
    image, expression = deploy.sample_question()
    out = deploy.verify(deployed["url"], image, expression, deployed["version"],
                        api_key=os.environ.get(deployed["api_key_env"]))
    logger = get_run_logger()
    if "error" in out:  # refused: the server refuses tasks the version is not approved for
        logger.warning("[refer] %s -> refused: %s", expression, out["error"]["message"])
        return out["error"]["message"]
    answer = out["choices"][0]["message"]["content"]
    logger.info("[refer] %s -> %s", expression, answer)
    if out["skyeye"].get("warning"):
        logger.warning("%s", out["skyeye"]["warning"])
    return answer


@task(name="record")
def record_task(deployed: dict) -> None:
    deploy.record(deploy.Deployed(deployed["version"], deployed["uri"], deployed["url"], deployed["replaced"]))


@flow(name="serve", log_prints=True)
def serve(model: str | None = None, host: str | None = None, port: int | None = None,
          canary: dict | None = None) -> dict:
    """Deploy (with a candidate beside production where `canary` or configs/serve.yaml says so)
    -> verify (health, a real question) -> record the deployment on the version."""
    deployed = deploy_task(model, host, port, canary)
    deployed["answer"] = verify_task(deployed)
    record_task(deployed)
    return deployed


@flow(name="rollout", log_prints=True)
def rollout(version: int) -> str:
    """Production moved to `version`: on a cluster (RAY_ADDRESS) the serve flow rolls it out;
    on one machine, the local `skyeye serve` that follows production does, and this waits
    for it. With neither, it records what it would have deployed."""
    from prefect.artifacts import create_markdown_artifact
    logger = get_run_logger()
    if os.environ.get("RAY_ADDRESS"):
        return f"served at {serve(model=str(version))['url']}/v1"
    state = deploy.read_state()
    if state and state.get("follows") == "production":
        if deploy.wait_for_version(state["url"], version, api_key=os.environ.get(load_serve_config().api_key_env)):
            return f"served at {state['url']}/v1"
        logger.warning("the server at %s did not roll out version %d within 3 minutes", state["url"], version)
        return f"not served: the server at {state['url']} still serves another version"
    note = (f"version {version} would be deployed now: no cluster (RAY_ADDRESS) and no local `skyeye serve` "
            "following production; start one and it serves production")
    logger.info(note)
    create_markdown_artifact(key="rollout", markdown=f"## Rollout\n{note}", description="what was deployed")
    return "not served (start it with `skyeye serve`)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Deploy a registered SkyEyeGPT version on Ray Serve.")
    parser.add_argument("--model", default=None, help="registry reference (default: models:/skyeyegpt@production)")
    args = parser.parse_args()
    print(serve(model=args.model))
