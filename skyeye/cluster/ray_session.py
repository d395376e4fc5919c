"""One Ray session for training, the sharded evaluation and serving: how this process
reaches Ray, and what its workers are told.

- `connect`: Ray already up in this process is used as it is; else the cluster RAY_ADDRESS
  names (its resources, its auth); else a private single-machine Ray (`start_local_ray`),
  never a stray cluster something else started or left behind.
- `worker_env`: the environment a Ray worker (an evaluation actor, a serving replica) gets:
  the same store, project and registered model as this process, and the variables of
  `FORWARDED_ENV` set here.

`ray` is imported inside the functions: importing it costs about a second, and the CLI
reaches this module on commands that never start Ray.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from ..config import Settings
from ..model.references import model_name

# forwarded to the workers when set here; no secrets (runtime envs are readable through Ray's
# state API): a cluster's nodes carry their own credentials, and a local Ray's workers inherit
# this process's environment
FORWARDED_ENV = ("HF_HUB_OFFLINE", "SKYEYE_HUB_ONLINE", "SKYEYE_STATE_DIR", "SKYEYE_DATA_DIR",
                 "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

_PROCESS_TOKEN = secrets.token_hex(32)  # one per process: Ray caches the token it first sees


def on_cluster() -> bool:
    """Whether RAY_ADDRESS names a cluster to use instead of a local Ray."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect(num_cpus: int, num_gpus: int | None = 0, verbose: bool = False) -> bool:
    """Ray for this process; True when `ray.init` ran here (the caller then ends the session
    with `ray.shutdown()`), False when Ray was already up. `num_cpus` and `num_gpus` (None:
    the GPUs there are) size a local Ray; a cluster brings its own."""
    import ray
    if ray.is_initialized():
        return False
    if on_cluster():  # an existing cluster: its resources, its auth
        ray.init(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
    else:
        start_local_ray(num_cpus, num_gpus, verbose)
    return True


def start_local_ray(num_cpus: int, num_gpus: int | None = 0, verbose: bool = False) -> None:
    """Start a private single-machine Ray in this process. It never attaches to a cluster
    that something else started or left behind (`address="local"`)."""
    import ray
    user_auth = any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
        or (Path.home() / ".ray" / "auth_token").exists()
    if not user_auth:
        # Ray 2.60 turns token auth on for a new local cluster (its ports listen on every
        # interface) and would write a token to ~/.ray. Keep auth on, with a token in this
        # process's environment that raylet and workers inherit. It stays set: Ray caches the
        # auth mode and token per process, so a later ray.init here must see the same ones.
        os.environ["RAY_AUTH_TOKEN"] = _PROCESS_TOKEN
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,  # None: Ray counts the GPUs there are
        object_store_memory=256 * 1024**2,  # checkpoints and models travel as files, not objects
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
    )


def worker_env(s: Settings, *also: str) -> dict[str, str]:
    """What a worker must know that this process knows: the same store, project and names,
    `FORWARDED_ENV` and the variables named in `also` (e.g. the serving API key) when set here."""
    env = {"SKYEYE_PROJECT_ROOT": str(s.project_root), "SKYEYE_MLFLOW_TRACKING_URI": s.tracking_uri,
           "MLFLOW_TRACKING_URI": s.tracking_uri, "SKYEYE_REGISTERED_MODEL": model_name()}
    if s.data_dir:  # resolved: a worker's working directory may differ from ours
        env["SKYEYE_DATA_DIR"] = str(s.data)
    if s.state_dir:
        env["SKYEYE_STATE_DIR"] = str(s.state)
    return {**{k: os.environ[k] for k in (*FORWARDED_ENV, *also) if os.environ.get(k)}, **env}
