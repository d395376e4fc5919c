"""infra/: the compose file, the SkyEye image, its helper scripts and the Kubernetes manifests,
checked without a container runtime or a cluster (there is neither here):

- compose.yaml against the Compose specification's JSON schema (as vendored by
  check-jsonschema), after interpolating infra/.env.example, plus what the schema cannot
  see: dependencies, volumes, variables, health checks, ports, the files it mounts and runs;
- Deployments, Services, ConfigMaps, Secrets and the Ray pods' templates against the
  Kubernetes OpenAPI schemas (kubernetes-validate); the KubeRay objects against the fields
  ray.io/v1 requires, their serveConfigV2 against Ray Serve's own schema, and the RayService's
  application builder through Ray's own loader;
- every `skyeye`, `ray`, `mlflow` and `prefect` command the files run, with each option
  it passes, against the installed CLIs (`<command> --help`);
- the scripts for real: the PostgreSQL init script on a PostgreSQL 15 server, the bucket
  job on an in-process S3 (moto).

Each checker is also run on a broken copy, to show that it catches what it is meant to.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from services import Postgres, pg_installed

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
BIN = Path(sys.executable).parent
IMAGE_ROOT = "/srv/skyeye"  # where infra/Dockerfile puts the checkout
K8S_VERSIONS = ("1.29", "1.37")  # oldest and newest Kubernetes the manifests are checked against
NEEDS_HEALTHCHECK = {"postgres", "minio", "mlflow", "prefect", "ray-head"}
CLIS = ("skyeye", "ray", "mlflow", "prefect")


# ------------------------------------------------------------------ compose: reading

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped)."""
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{n}: not KEY=VALUE: {line!r}"
        env[key] = value.strip().strip("'\"")
    return env


_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def variables_used(text: str) -> set[str]:
    """Names of the variables compose interpolates in `text` ($$ is a literal dollar)."""
    names = set()
    for m in _VAR.finditer(text):
        if m["braced"] is not None:
            names.add(re.match(r"[A-Za-z_][A-Za-z0-9_]*", m["braced"])[0])
        elif m["named"]:
            names.add(m["named"])
    return names


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in `value`: ${VAR}, ${VAR:-default},
    ${VAR-default}, ${VAR:+alt}, ${VAR:?error}, $VAR and $$. An unset variable without a
    default is an error here (compose would warn and use "")."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m["dollar"]:
            return "$"
        expr = m["braced"] if m["braced"] is not None else m["named"]
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?(.*)", expr, re.S).groups()
        current = env.get(name)
        is_set = bool(current) if op and op.startswith(":") else current is not None
        if op in (":-", "-"):
            return current if is_set else arg
        if op in (":+", "+"):
            return arg if is_set else ""
        if current is None:
            raise KeyError(f"variable {name} is not set" + (f": {arg}" if op and "?" in op else ""))
        return current
    return _VAR.sub(one, value)


def load_compose(path: Path = INFRA / "compose.yaml") -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(INFRA / ".env.example")


@pytest.fixture(scope="module")
def compose(env_example) -> dict:
    """compose.yaml as compose sees it: YAML merge keys resolved, variables interpolated."""
    return interpolate(load_compose(), env_example)


# ------------------------------------------------------------------ compose: the checks

def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _named_volumes(service: dict) -> list[str]:
    names = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            if vol.get("type", "volume") == "volume" and vol.get("source"):
                names.append(vol["source"])
            continue
        source = vol.split(":")[0]
        if ":" in vol and not source.startswith((".", "/", "~", "$")):
            names.append(source)
    return names


def _host_ports(service: dict) -> list[tuple[str, str]]:
    """(interface, host port) of each published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                out.append((str(port.get("host_ip", "0.0.0.0")), str(port["published"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1]))
        elif len(parts) == 2:
            out.append(("0.0.0.0", parts[0]))
    return out


def _healthcheck(service: dict) -> dict | None:
    check = service.get("healthcheck")
    if not check or check.get("disable") in (True, "true") or check.get("test") in (["NONE"], "NONE"):
        return None
    return check


def compose_problems(doc: dict) -> list[str]:
    """What the schema cannot see: each a sentence naming the service."""
    problems = []
    services = doc.get("services") or {}
    declared_volumes = set(doc.get("volumes") or {})
    if not services:
        return ["no services"]
    for name, svc in services.items():
        if not (svc.get("image") or svc.get("build")):
            problems.append(f"{name}: neither image nor build")
        for dep, condition in _depends(svc).items():
            if dep not in services:
                problems.append(f"{name}: depends_on names {dep!r}, which is not a service")
            elif dep == name:
                problems.append(f"{name}: depends on itself")
            elif condition == "service_healthy" and not _healthcheck(services[dep]):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif condition == "service_completed_successfully" and services[dep].get("restart") not in (None, "no"):
                problems.append(f"{name}: waits for {dep} to complete, but {dep} restarts ({services[dep]['restart']})")
        for vol in _named_volumes(svc):
            if vol not in declared_volumes:
                problems.append(f"{name}: volume {vol!r} is not declared under the top-level volumes")
    for name in sorted(NEEDS_HEALTHCHECK):
        if name not in services:
            problems.append(f"{name}: missing service")
        elif not _healthcheck(services[name]):
            problems.append(f"{name}: no healthcheck")
    seen: dict[tuple[str, str], str] = {}
    for name, svc in services.items():
        for iface, port in _host_ports(svc):
            for (other_iface, other_port), owner in seen.items():
                if port == other_port and (iface == other_iface or "0.0.0.0" in (iface, other_iface)):
                    problems.append(f"{name}: host port {iface}:{port} is also published by {owner}")
            seen[(iface, port)] = name
    # a dependency cycle would stop `docker compose up` before it starts anything
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in _depends(services[node]):
            if dep in services and dep != node:
                if state.get(dep) == 1:
                    problems.append(f"dependency cycle: {' -> '.join([*path, node, dep])}")
                elif not state.get(dep):
                    visit(dep, [*path, node])
        state[node] = 2
    for node in services:
        if not state.get(node):
            visit(node, [])
    return problems


def compose_schema_errors(doc: dict) -> list[str]:
    from jsonschema import Draft202012Validator
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification(compose):
    assert compose_schema_errors(compose) == []


def test_the_compose_schema_check_catches_a_misspelt_and_a_mistyped_field(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["healthcheck"]["intreval"] = "10s"
    broken["services"]["postgres"]["depends_on"] = {"minio": {"condition": "when_ready"}}
    errors = "\n".join(compose_schema_errors(broken))
    assert "intreval" in errors and "when_ready" in errors


def test_compose_services_hang_together(compose):
    assert compose_problems(compose) == []


BREAKAGES = {
    "undefined dependency": (lambda d: d["services"]["mlflow"]["depends_on"].update(
        {"redis": {"condition": "service_started"}}), "'redis', which is not a service"),
    "undeclared volume": (lambda d: d["volumes"].pop("minio"), "volume 'minio' is not declared"),
    "no image": (lambda d: d["services"]["minio"].pop("image"), "minio: neither image nor build"),
    "port twice": (lambda d: d["services"]["prefect"]["ports"].append(d["services"]["mlflow"]["ports"][0]),
                   "is also published by mlflow"),
    "no healthcheck": (lambda d: d["services"]["ray-head"].pop("healthcheck"), "ray-head: no healthcheck"),
    "waits on an unhealthy-able service": (
        lambda d: d["services"]["serve"]["depends_on"].update({"buckets": {"condition": "service_healthy"}}),
        "buckets has no healthcheck"),
    "cycle": (lambda d: d["services"]["postgres"].update({"depends_on": {"mlflow": {"condition": "service_healthy"}}}),
              "dependency cycle"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_the_compose_checker_catches(compose, breakage):
    change, expected = BREAKAGES[breakage]
    broken = copy.deepcopy(compose)
    change(broken)
    assert any(expected in p for p in compose_problems(broken)), compose_problems(broken)


def test_every_variable_is_in_env_example_and_every_entry_is_used(env_example):
    used = variables_used((INFRA / "compose.yaml").read_text())
    assert used - set(env_example) == set(), "used in compose.yaml, missing from .env.example"
    assert set(env_example) - used == set(), "in .env.example, used nowhere in compose.yaml"
    # and the check itself: $$ is not a variable, ${X:-d} is X
    assert variables_used("a $$HOME ${X:-d} $Y ${Z?e}") == {"X", "Y", "Z"}
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET}", {})
    assert interpolate("${A:-x}/${B-y}/${B:+z}/${C:+w}/$$A", {"B": "", "C": "c"}) == "x///w/$A"


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def test_the_services_are_wired_as_the_readme_says(compose, env_example):
    s = compose["services"]
    user, password = env_example["POSTGRES_USER"], env_example["POSTGRES_PASSWORD"]
    # one PostgreSQL 15 for both servers, its databases made by the init script
    assert s["postgres"]["image"].split(":")[1].startswith("15")
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-skyeye-databases.sh:ro" in s["postgres"]["volumes"]
    mlflow = _command(s["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"]
    assert f"--backend-store-uri=postgresql://{user}:{password}@postgres:5432/mlflow" in mlflow
    assert "--artifacts-destination=s3://mlflow/" in mlflow
    assert _environment(s["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect = _environment(s["prefect"])
    assert _command(s["prefect"])[:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    assert prefect["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == \
        f"postgresql+asyncpg://{user}:{password}@postgres:5432/prefect"
    assert _command(s["buckets"])[-3:] == ["mlflow", "dvc", "ray"]
    # Ray: one image on head, workers and drivers; the drivers join as nodes and name the head
    head, worker = _command(s["ray-head"]), _command(s["ray-worker"])
    assert head[:2] == ["ray", "start"] and {"--head", "--block", "--port=6379"} <= set(head)
    assert {"--address=ray-head:6379", "--block"} <= set(worker)
    skyeye_services = [n for n, svc in s.items() if svc.get("image") == s["ray-head"]["image"]]
    assert set(skyeye_services) >= {"ray-head", "ray-worker", "scheduler", "serve", "mlflow", "prefect", "buckets"}
    assert _command(s["scheduler"]) == ["/srv/skyeye/infra/ray-node.sh", "skyeye", "schedule", "up"]
    assert _command(s["serve"])[-2:] == ["skyeye", "serve"]
    for name in ("ray-head", "ray-worker", "scheduler", "serve"):
        assert s[name]["volumes"] == s["ray-head"]["volumes"], f"{name}: data and state not where the head has them"
    for name in ("scheduler", "serve"):
        assert _environment(s[name])["RAY_ADDRESS"] == "ray-head:6379"
    # every URL SkyEye is given names a service of this file, on a port it listens on
    listens = {"mlflow": "5000", "prefect": "4200", "minio": "9000", "ray-head": "6379"}
    for name, svc in s.items():
        env = _environment(svc)
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                    "RAY_ADDRESS"):
            if key in env:
                host, port = re.match(r"(?:\w+://)?([^:/]+):(\d+)", env[key]).groups()
                assert listens.get(host) == port, f"{name}: {key}={env[key]} is no service of compose.yaml"
        if "AWS_ACCESS_KEY_ID" in env:
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
                (env_example["MINIO_ROOT_USER"], env_example["MINIO_ROOT_PASSWORD"])


def test_what_compose_builds_mounts_and_runs_exists(compose):
    s = compose["services"]
    for name, svc in s.items():
        if build := svc.get("build"):
            context = (INFRA / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes") or []:
            if isinstance(vol, str) and vol.startswith("."):
                assert (INFRA / vol.split(":")[0]).is_file(), f"{name}: mounts a missing {vol}"
        for word in _command(svc):
            if word.startswith(IMAGE_ROOT + "/"):
                path = ROOT / word[len(IMAGE_ROOT) + 1:]
                assert path.is_file(), f"{name}: runs {word}, which is not in the checkout"
                if _command(svc)[0] == word:
                    assert os.access(path, os.X_OK), f"{name}: {path} is run directly but is not executable"
    for script in ("postgres-init.sh", "ray-node.sh"):
        shell = "bash" if script.endswith("init.sh") else "sh"
        out = subprocess.run([shell, "-n", str(INFRA / script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def shell_snippets() -> list[tuple[str, str]]:
    """(where, shell text) of what runs through a shell: CMD-SHELL health checks, RayJob
    entrypoints, and the bodies of the `bash -c '...'` / `sh -c "..."` inside them."""
    out = []
    for name, svc in load_compose()["services"].items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD-SHELL"]:
            out.append((f"compose {name} healthcheck", test[1]))
    out += [(f"{n} entrypoint", d["spec"]["entrypoint"]) for n, d in k8s_documents() if d["kind"] == "RayJob"]
    for where, text in out:  # grows as inner scripts are found
        words = shlex.split(text)
        out += [(f"{where} ({words[i - 1]} -c)", words[i + 1]) for i, w in enumerate(words[:-1])
                if w == "-c" and i and words[i - 1] in ("bash", "sh")]
    return out


def test_the_shell_snippets_parse():
    snippets = shell_snippets()
    assert len(snippets) >= 4  # the postgres check, the RayJob entrypoint and its two inner scripts
    for where, text in snippets:
        out = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
        assert out.returncode == 0, f"{where}: {out.stderr}"
    out = subprocess.run(["bash", "-n", "-c", "until true; do"], capture_output=True, text=True)
    assert out.returncode != 0  # and bash -n does refuse a broken one


# ------------------------------------------------------------------ the image

def test_the_image_pins_the_projects_torch_and_serves_on_every_interface():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    pinned = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
              if re.match(r"torch\s*==", d)]
    assert pinned, "pyproject.toml no longer pins torch exactly"
    version = pinned[0].split("==")[1].strip()
    assert f"ARG TORCH_VERSION={version}\n" in dockerfile, f"infra/Dockerfile must install torch {version} (CPU)"
    assert "download.pytorch.org/whl/cpu" in dockerfile and "RUN pip install .\n" in dockerfile
    # the sed that opens the API in a container must still match configs/serve.yaml
    sed = re.search(r"sed -i 's/(\^host: \.\*)/([^/]*(?:\\/[^/]*)*)/' \\\s*configs/serve\.yaml", dockerfile)
    assert sed, "infra/Dockerfile no longer rewrites the host of configs/serve.yaml"
    text = (ROOT / "configs" / "serve.yaml").read_text()
    assert len(re.findall(r"^host: ", text, re.M)) == 1
    from skyeye.serving.config import ServeConfig
    rewritten = re.sub(r"^host: .*", sed[2].replace("\\/", "/"), text, flags=re.M)
    assert ServeConfig.model_validate(yaml.safe_load(rewritten)).host == "0.0.0.0"
    ignored = {line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert ".git" not in ignored and {".venv", "data", "mlruns", ".skyeye", "infra/.env"} <= ignored


# ------------------------------------------------------------------ the scripts, for real

def test_the_bucket_job_creates_the_three_buckets_once():
    moto = pytest.importorskip("moto")
    import boto3
    spec = importlib.util.spec_from_file_location("create_buckets", INFRA / "create_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="dvc")
        assert module.create_buckets(module.DEFAULT_BUCKETS, client=s3) == \
            {"mlflow": "created", "dvc": "exists", "ray": "created"}
        assert module.create_buckets(module.DEFAULT_BUCKETS, client=s3) == dict.fromkeys(module.DEFAULT_BUCKETS,
                                                                                          "exists")
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"mlflow", "dvc", "ray"}


@pytest.mark.skipif(not pg_installed() or not shutil.which("psql"),
                    reason="PostgreSQL 15 is not installed (Debian: apt-get install postgresql-15)")
def test_the_postgres_init_script_makes_both_databases_and_can_run_again():
    """On a real PostgreSQL 15, on a socket in a temporary folder (no TCP), as the image runs it."""
    pg = Postgres(tcp=False).start()
    try:
        env = {**os.environ, "PGHOST": str(pg.folder), "PGPORT": str(pg.port), "POSTGRES_USER": pg.user,
               "POSTGRES_DB": "postgres"}
        for _ in range(2):
            out = subprocess.run(["bash", str(INFRA / "postgres-init.sh")], env=env, capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
        listed = subprocess.run(["psql", "-U", pg.user, "-d", "postgres", "-Atc",
                                 "select datname || ' ' || pg_get_userbyid(datdba) from pg_database"],
                                env=env, capture_output=True, text=True, timeout=60).stdout.split("\n")
        assert {"mlflow skyeye", "prefect skyeye"} <= set(listed)
    finally:
        pg.remove()


# ------------------------------------------------------------------ Kubernetes

def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, dict]]:
    return k8s_documents()


def test_the_kustomization_lists_every_manifest_and_only_those():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].split(":")[0] for _, doc in k8s_documents() for c in _containers(doc)}
    assert used == images == {"skyeye"}


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a Deployment or a KubeRay object."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "Deployment":
        return [("spec.template", spec["template"])]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])
    if not cluster:
        return []
    out = [("headGroupSpec.template", (cluster.get("headGroupSpec") or {}).get("template") or {})]
    for group in cluster.get("workerGroupSpecs") or []:
        out.append((f"workerGroupSpecs[{group.get('groupName')}].template", group.get("template") or {}))
    return out


def _containers(doc: dict) -> list[dict]:
    return [c for _, t in _pod_templates(doc) for c in (t.get("spec") or {}).get("containers") or []]


@functools.lru_cache(maxsize=None)
def _kubernetes_validator(version: str, kind: str, api_version: str):
    """A strict validator (no unknown fields) from kubernetes-validate's schemas, built once
    per kind (its own validate() reads the 1 MB definitions file on every call)."""
    from jsonschema import Draft202012Validator
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version
    from referencing import Registry, Resource
    shipped = [v for v in all_versions() if Version(v).release[:2] == Version(version).release[:2]]
    assert shipped, f"kubernetes-validate has no schemas for Kubernetes {version}"
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = schemas / f"v{shipped[-1]}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 -> apps-v1, v1 -> v1
    schema = json.loads((folder / f"{kind.lower()}-{group}.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return Draft202012Validator(schema, registry=registry)


def kubernetes_schema_errors(name: str, doc: dict) -> list[str]:
    """Core objects against Kubernetes' OpenAPI schemas (strict: no unknown fields); the pod
    templates inside KubeRay objects too, as PodTemplates."""
    checks = [] if doc["apiVersion"].startswith("ray.io/") else [(doc["kind"], doc)]
    if doc["apiVersion"].startswith("ray.io/"):
        checks += [(f"{doc['kind']} {where}", {"apiVersion": "v1", "kind": "PodTemplate",
                                               "metadata": {"name": "template"}, "template": template})
                   for where, template in _pod_templates(doc)]
    errors = []
    for what, obj in checks:
        for version in K8S_VERSIONS:
            validator = _kubernetes_validator(version, obj["kind"], obj["apiVersion"])
            errors += [f"{name} {what} (Kubernetes {version}) {'.'.join(map(str, e.absolute_path))}: {e.message}"
                       for e in validator.iter_errors(obj)]
    return errors


def test_core_objects_and_ray_pod_templates_match_the_kubernetes_schemas(manifests):
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster",
            "RayJob", "RayService"} <= kinds
    assert [e for name, doc in manifests for e in kubernetes_schema_errors(name, doc)] == []


def test_the_kubernetes_schema_check_catches_a_wrong_type_and_an_unknown_field(manifests):
    deployment = copy.deepcopy(next(d for _, d in manifests if d["kind"] == "Deployment"))
    deployment["spec"]["replicas"] = "two"
    cluster = copy.deepcopy(next(d for _, d in manifests if d["kind"] == "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envForm"] = []
    assert "'two' is not of type" in " ".join(kubernetes_schema_errors("x", deployment))
    assert "envForm" in " ".join(kubernetes_schema_errors("x", cluster))


# The fields KubeRay's ray.io/v1 CRDs require (headGroupSpec.template; a worker group's
# groupName, minReplicas, maxReplicas, template; RayService's rayClusterConfig), plus those
# SkyEye's manifests always set though the CRDs leave them optional (rayStartParams, replicas,
# workerGroupSpecs; RayJob's entrypoint, shutdownAfterJobFinishes, rayClusterSpec).
_GROUP = {"type": "object", "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                                         "template"],
          "properties": {"groupName": {"type": "string", "minLength": 1},
                         "replicas": {"type": "integer", "minimum": 0},
                         "minReplicas": {"type": "integer", "minimum": 0},
                         "maxReplicas": {"type": "integer", "minimum": 0},
                         "rayStartParams": {"$ref": "#/$defs/params"},
                         "template": {"$ref": "#/$defs/template"}}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
                 "properties": {"rayVersion": {"type": "string"},
                                "authOptions": {"type": "object", "properties": {
                                    "mode": {"enum": ["disabled", "token"]}}},
                                "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                                  "properties": {"rayStartParams": {"$ref": "#/$defs/params"},
                                                                 "template": {"$ref": "#/$defs/template"}}},
                                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": _GROUP}}}
KUBERAY_SCHEMAS = {
    kind: {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
           "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                          "metadata": {"type": "object", "required": ["name"]}, "spec": spec},
           "$defs": {"params": {"type": "object", "additionalProperties": {"type": "string"}},
                     "template": {"type": "object", "required": ["spec"], "properties": {"spec": {
                         "type": "object", "required": ["containers"],
                         "properties": {"containers": {"type": "array", "minItems": 1}}}}},
                     "cluster": _CLUSTER_SPEC}}
    for kind, spec in {
        "RayCluster": {"$ref": "#/$defs/cluster"},
        "RayJob": {"type": "object", "required": ["entrypoint", "shutdownAfterJobFinishes", "rayClusterSpec"],
                   "properties": {"entrypoint": {"type": "string", "minLength": 1},
                                  "runtimeEnvYAML": {"type": "string"},
                                  "shutdownAfterJobFinishes": {"type": "boolean"},
                                  "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                                  "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                                  "backoffLimit": {"type": "integer", "minimum": 0},
                                  "rayClusterSpec": {"$ref": "#/$defs/cluster"}}},
        "RayService": {"type": "object", "required": ["serveConfigV2", "rayClusterConfig"],
                       "properties": {"serveConfigV2": {"type": "string"},
                                      "rayClusterConfig": {"$ref": "#/$defs/cluster"}}},
    }.items()}


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
            "RayService": doc["spec"].get("rayClusterConfig")}[doc["kind"]] or {}


def kuberay_problems(doc: dict, ray_start_help: str) -> list[str]:
    """The minimal CRD schema, then what KubeRay's admission and Ray would refuse."""
    from jsonschema import Draft202012Validator
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    kind = doc["kind"]
    problems = [f"{kind} {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in Draft202012Validator(KUBERAY_SCHEMAS[kind]).iter_errors(doc)]
    if problems:
        return problems
    cluster = _cluster_spec(doc)
    ray_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                   if re.match(r"ray\[", d))
    if cluster.get("authOptions", {}).get("mode") == "token":
        if not cluster.get("rayVersion") or Version(cluster["rayVersion"]) < Version("2.52.0"):
            problems.append(f"{kind}: token auth needs rayVersion 2.52.0 or later, got {cluster.get('rayVersion')}")
    if cluster.get("rayVersion") and Version(cluster["rayVersion"]) not in SpecifierSet(ray_pin.split("]", 1)[1]):
        problems.append(f"{kind}: rayVersion {cluster['rayVersion']} is not the project's Ray ({ray_pin})")
    groups = [("head", cluster["headGroupSpec"]), *((g["groupName"], g) for g in cluster["workerGroupSpecs"])]
    for group, spec in groups:
        for param in spec["rayStartParams"]:
            if not re.search(rf"(?<![\w-])--{re.escape(param)}(?![\w-])", ray_start_help):
                problems.append(f"{kind} {group}: rayStartParams {param!r} is no option of `ray start`")
        if group != "head" and not spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]:
            problems.append(f"{kind} {group}: replicas {spec['replicas']} outside "
                            f"[{spec['minReplicas']}, {spec['maxReplicas']}]")
    if kind == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
        from ray.runtime_env import RuntimeEnv
        try:
            RuntimeEnv(**(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}))
        except Exception as err:  # Ray's own validation of each field
            problems.append(f"RayJob runtimeEnvYAML: {err}")
    if kind == "RayService":
        from ray.serve.schema import ServeDeploySchema
        try:
            config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        except Exception as err:
            return [*problems, f"RayService serveConfigV2: {err}"]
        for app in config.applications:
            for c in _containers(doc):
                if not importable_in_image(app.import_path, c):
                    problems.append(f"RayService: {app.import_path} is not importable in container {c['name']}")
    return problems


def importable_in_image(import_path: str, container: dict) -> bool:
    """Whether `module:attribute` resolves in the image: an installed module (the project is
    pip-installed there as here), or a file of the checkout on the container's PYTHONPATH."""
    module, _, attr = import_path.partition(":")
    top = module.split(".")[0]
    if top in ("skyeye", "flows") or (importlib.util.find_spec(top) and top not in sys.builtin_module_names):
        try:
            return hasattr(importlib.import_module(module), attr)
        except ImportError:
            return False
    paths = [p for e in container.get("env") or [] if e["name"] == "PYTHONPATH" for p in e["value"].split(":")]
    for path in paths:
        if path.startswith(IMAGE_ROOT + "/"):
            file = ROOT / path[len(IMAGE_ROOT) + 1:] / (module.replace(".", "/") + ".py")
            if file.is_file() and re.search(rf"^def {re.escape(attr)}\(", file.read_text(), re.M):
                return True
    return False


@pytest.fixture(scope="module", autouse=True)
def cli_help():
    """`<cli> <subcommand> --help` of everything the files run, started at once when this
    module starts (they take seconds each) and read when a test needs them."""
    helps = HelpCache()
    yield helps
    helps.pool.shutdown(wait=False, cancel_futures=True)


def test_the_kuberay_objects_have_what_kuberay_and_ray_require(manifests, cli_help):
    ray_start = cli_help.get("ray", ("start",))[1]
    ray_objects = [(n, d) for n, d in manifests if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_objects} == {"RayCluster", "RayJob", "RayService"}
    assert {n: kuberay_problems(d, ray_start) for n, d in ray_objects} == {n: [] for n, _ in ray_objects}
    job = next(d for _, d in ray_objects if d["kind"] == "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "skyeye train --stage 1" in job["spec"]["entrypoint"]


KUBERAY_BREAKAGES = {
    "no rayStartParams": ("RayCluster", lambda d: d["spec"]["headGroupSpec"].pop("rayStartParams"),
                          "'rayStartParams' is a required property"),
    "group without maxReplicas": ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop(
        "maxReplicas"), "'maxReplicas' is a required property"),
    "replicas above the maximum": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=9),
                                   "replicas 9 outside"),
    "an invented ray start option": ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpu": "1"}), "'num-cpu' is no option of `ray start`"),
    "a number where KubeRay wants a string": ("RayCluster", lambda d: d["spec"]["headGroupSpec"][
        "rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
    "token auth on an old Ray": ("RayService", lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.40.0"),
                                 "token auth needs rayVersion 2.52.0"),
    "no entrypoint": ("RayJob", lambda d: d["spec"].pop("entrypoint"), "'entrypoint' is a required property"),
    "a runtime env Ray refuses": ("RayJob", lambda d: d["spec"].update(runtimeEnvYAML="env_vars: [1, 2]\n"),
                                  "runtimeEnvYAML"),
    "a serve config without import_path": ("RayService", lambda d: d["spec"].update(
        serveConfigV2="applications:\n  - name: skyeye\n"), "import_path"),
    "an import path nowhere on the pods": ("RayService", lambda d: d["spec"].update(serveConfigV2=d["spec"][
        "serveConfigV2"].replace("rayservice_app:build", "skyeye_app:build")), "is not importable"),
}


@pytest.mark.parametrize("breakage", KUBERAY_BREAKAGES)
def test_the_kuberay_checker_catches(manifests, cli_help, breakage):
    kind, change, expected = KUBERAY_BREAKAGES[breakage]
    doc = copy.deepcopy(next(d for _, d in manifests if d["kind"] == kind))
    change(doc)
    problems = kuberay_problems(doc, cli_help.get("ray", ("start",))[1])
    assert any(expected in p for p in problems), problems


def k8s_reference_problems(docs: list[tuple[str, dict]]) -> list[str]:
    """ConfigMaps, Secrets, keys, claims and Service selectors that point at nothing here."""
    data = {}
    for _, d in docs:
        if d["kind"] in ("ConfigMap", "Secret"):
            data[(d["kind"], d["metadata"]["name"])] = set(d.get("data") or {}) | set(d.get("stringData") or {})
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    problems = []
    for name, doc in docs:
        for where, template in _pod_templates(doc):
            spec = template.get("spec") or {}
            for c in spec.get("containers") or []:
                for src in c.get("envFrom") or []:
                    for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                        if key in src and (kind, src[key]["name"]) not in data and not src[key].get("optional"):
                            problems.append(f"{name} {where}: {kind} {src[key]['name']} is not defined")
                for env in c.get("env") or []:
                    for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                        ref = (env.get("valueFrom") or {}).get(key)
                        if ref and ref["key"] not in data.get((kind, ref["name"]), set()):
                            problems.append(f"{name} {where}: {kind} {ref['name']} has no key {ref['key']}")
            for vol in spec.get("volumes") or []:
                if "persistentVolumeClaim" in vol and vol["persistentVolumeClaim"]["claimName"] not in claims:
                    problems.append(f"{name} {where}: claim {vol['persistentVolumeClaim']['claimName']} is not defined")
            mounts = {m["name"] for c in spec.get("containers") or [] for m in c.get("volumeMounts") or []}
            if missing := mounts - {v["name"] for v in spec.get("volumes") or []}:
                problems.append(f"{name} {where}: mounts undeclared volumes {sorted(missing)}")
    for name, svc in ((n, d) for n, d in docs if d["kind"] == "Service"):
        targets = [d for _, d in docs if d["kind"] == "Deployment" and
                   svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if len(targets) != 1:
            problems.append(f"{name}: Service {svc['metadata']['name']} selects {len(targets)} Deployments")
            continue
        ports = {p.get("name") for c in _containers(targets[0]) for p in c.get("ports") or []}
        for port in svc["spec"]["ports"]:
            if isinstance(port["targetPort"], str) and port["targetPort"] not in ports:
                problems.append(f"{name}: targetPort {port['targetPort']} is no container port")
    return problems


def test_every_reference_in_the_manifests_resolves(manifests):
    assert k8s_reference_problems(manifests) == []
    broken = copy.deepcopy(manifests)
    mlflow = next(d for _, d in broken if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    mlflow["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["key"] = "NOPE"
    next(d for _, d in broken if d["kind"] == "Service")["spec"]["selector"] = {"app": "none"}
    problems = " ".join(k8s_reference_problems(broken))
    assert "has no key NOPE" in problems and "selects 0 Deployments" in problems


def test_the_rayservice_builder_builds_the_application_skyeye_serve_deploys(manifests, monkeypatch):
    """Through Ray's own loader, with the args of rayservice.yaml (the registry stubbed)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    import skyeye.model.references as references
    monkeypatch.setattr(references, "resolve_version", lambda ref: 7 if ref == "models:/skyeyegpt@production" else 0)
    service = next(d for _, d in manifests if d["kind"] == "RayService")
    app_config = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    module_name, attr = app_config["import_path"].split(":")
    spec = importlib.util.spec_from_file_location(module_name, INFRA / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = call_user_app_builder_with_args_if_necessary(getattr(module, attr), app_config["args"])
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert (deployment.name, deployment.init_args) == ("SkyEyeGPT", ("models:/skyeyegpt/7",))
    assert deployment.num_replicas == app_config["args"]["replicas"]
    with pytest.raises(Exception, match="replics"):  # a misspelt field of configs/serve.yaml is refused
        call_user_app_builder_with_args_if_necessary(getattr(module, attr), {"replics": 2})


# ------------------------------------------------------------------ the commands they run

class HelpCache:
    """`<bin>/<cli> <words> --help`, each run once, all started at once (they take seconds)."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, tuple[str, ...]], tuple[int, str]] = {}
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.pending = {}
        for program, words, _ in all_invocations():
            self.start(program, words)

    def start(self, program: str, words: tuple[str, ...]) -> None:
        key = (program, words)
        if key not in self.pending:
            env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
            self.pending[key] = self.pool.submit(subprocess.run, [str(BIN / program), *words, "--help"],
                                                 capture_output=True, text=True, timeout=120, env=env)

    def get(self, program: str, words: tuple[str, ...]) -> tuple[int, str]:
        self.start(program, words)
        out = self.pending[(program, words)].result()
        return out.returncode, out.stdout + out.stderr


_PUNCTUATION = ";&|(){}"


def _separator(token: str) -> bool:
    return bool(token) and all(ch in _PUNCTUATION for ch in token)


def invocations_in(text: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(program, subcommand words, options) of each skyeye/ray/mlflow/prefect command in a
    shell command line (`bash -c '...'` bodies included)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=_PUNCTUATION)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens):
        if token in ("-c",) and i and tokens[i - 1] in ("bash", "sh") and i + 1 < len(tokens):
            found += invocations_in(tokens[i + 1])
        program = token.rsplit("/", 1)[-1]
        if program not in CLIS or (i and not _separator(tokens[i - 1]) and not tokens[i - 1].endswith(".sh")):
            continue
        words, options = [], []
        for word in tokens[i + 1:]:
            if _separator(word):
                break
            if word.startswith("-"):
                options.append(word.split("=", 1)[0])
            elif not options:
                words.append(word)
        found.append((program, tuple(words), tuple(options)))
    return found


def all_invocations() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Every command compose.yaml, the manifests and infra's scripts run: service commands and
    health checks, container commands with their args, RayJob entrypoints, `ray start` with
    KubeRay's params, and each line of infra/*.sh."""
    found = []
    for script in sorted(INFRA.glob("*.sh")):
        for line in script.read_text().replace("\\\n", " ").splitlines():
            try:
                found += invocations_in(line)
            except ValueError:  # a line of a here-document, not a command (`sh -n` checks the syntax)
                continue
    compose = load_compose()
    for svc in compose["services"].values():
        cmd = svc.get("command")
        found += invocations_in(cmd if isinstance(cmd, str) else shlex.join(map(str, cmd or [])))
        test = (svc.get("healthcheck") or {}).get("test") or []
        if isinstance(test, list) and test[:1] == ["CMD"]:
            found += invocations_in(shlex.join(test[1:]))
        elif isinstance(test, list) and test[:1] == ["CMD-SHELL"]:
            found += invocations_in(test[1])
    for _, doc in k8s_documents():
        for c in _containers(doc):
            found += invocations_in(shlex.join([*c.get("command", []), *c.get("args", [])]))
        if doc["kind"] == "RayJob":
            found += invocations_in(doc["spec"]["entrypoint"])
        if doc["apiVersion"].startswith("ray.io/"):
            cluster = _cluster_spec(doc)
            for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                found.append(("ray", ("start",), tuple(f"--{p}" for p in spec["rayStartParams"])))
    return found


def cli_problems(invocations, helps: HelpCache) -> list[str]:
    problems = []
    for program, words, options in invocations:
        code, text = helps.get(program, words)
        command = " ".join([program, *words])
        if code != 0:
            problems.append(f"`{command} --help` exits {code}: {text.strip().splitlines()[-1:]}")
            continue
        for option in options:
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                problems.append(f"`{command}` has no option {option}")
    return problems


def test_every_command_the_files_run_exists_with_its_options(cli_help):
    found = all_invocations()
    commands = {" ".join([p, *w]) for p, w, _ in found}
    assert {"skyeye schedule up", "skyeye serve", "skyeye train", "skyeye schedule status", "ray start",
            "mlflow server", "prefect server start"} <= commands
    assert cli_problems(found, cli_help) == []


def test_the_command_check_catches_an_invented_command_and_option(cli_help):
    assert invocations_in("bash -c 'cd /x && skyeye data build; skyeye train --stage 1 --num-workers=2'") == [
        ("skyeye", ("data", "build"), ()), ("skyeye", ("train",), ("--stage", "--num-workers"))]
    problems = cli_problems([("skyeye", ("no-such-command",), ()), ("skyeye", ("train",), ("--stages",))], cli_help)
    assert len(problems) == 2
    assert "`skyeye no-such-command --help` exits 2" in problems[0]
    assert problems[1] == "`skyeye train` has no option --stages"
