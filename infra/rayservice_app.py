"""The Ray Serve application builder that infra/k8s/rayservice.yaml's serveConfigV2 names
(`import_path: rayservice_app:build`, with /srv/skyeye/infra on PYTHONPATH).

SkyEye's own entry point, `skyeye.serving.deploy.application(uri, cfg, settings)`, takes three
arguments; Ray Serve calls a builder with exactly one (the `args` mapping of the config).
This adapts one to the other and builds the same application `skyeye serve` deploys:

    args:
      model: models:/skyeyegpt@production   # any registry reference; default: production
      replicas: 2                           # any other key: a field of configs/serve.yaml

The reference is resolved to its version when the application is built (as `skyeye serve`
does), so the served version changes when serveConfigV2 changes, not when the alias moves.
"""
from __future__ import annotations

from typing import Any


def build(args: dict[str, Any]):
    from skyeye.model.references import model_name, production_uri, resolve_version
    from skyeye.serving.config import ServeConfig, load_serve_config
    from skyeye.serving.deploy import application

    args = dict(args or {})
    ref = str(args.pop("model", None) or production_uri())
    cfg = load_serve_config()
    cfg = ServeConfig.model_validate({**cfg.model_dump(), **args})  # an unknown key is an error
    return application(f"models:/{model_name()}/{resolve_version(ref)}", cfg)
