"""Real servers for the server and cluster tests, each on free loopback ports, started and
stopped by the tests: PostgreSQL 15 (as an unprivileged user: it refuses root), an
S3-compatible store (moto's server mode), `mlflow server` on PostgreSQL with its artifacts
in the store, `prefect server start` on PostgreSQL, and Ray nodes started with `ray start`.
Each can be stopped and started again on the same port, for the fault tests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from processes import free_port

BIN = Path(sys.executable).parent
PG_BIN = Path(os.environ.get("SKYEYE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
S3_KEYS = {"AWS_ACCESS_KEY_ID": "skyeye-test", "AWS_SECRET_ACCESS_KEY": "skyeye-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def wait_until(what: str, check, timeout: float = 120, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as err:  # not up yet
            last = err
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


def _answers(url: str) -> bool:
    return httpx.get(url, timeout=3).status_code == 200


def stop_tree(proc: subprocess.Popen | None, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
    """Signal the process group started with start_new_session=True, then SIGKILL whatever of it is
    left (Ray's and uvicorn's children can outlive their parent)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Service:
    """A server process started by a command, answering at a health URL."""

    name = "service"

    def __init__(self, folder: Path, env: dict[str, str], port: int | None = None) -> None:
        self.folder, self.env, self.port = folder, env, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = folder / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def health_url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 180) -> "Service":
        self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.folder, start_new_session=True,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            return _answers(self.health_url())
        try:
            wait_until(f"{self.name} at {self.health_url()}", up, timeout)
        except RuntimeError as err:
            raise AssertionError(str(err)) from None
        return self

    def stop(self) -> None:
        stop_tree(self.proc)
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def pg_installed() -> bool:
    return (PG_BIN / "initdb").exists()


class Postgres:
    """A PostgreSQL 15 cluster in its own temporary folder, owned by an unprivileged user when
    the tests run as root, trusting local connections: on 127.0.0.1 and on a Unix socket in
    the folder, or (tcp=False) on the socket only. Every test's PostgreSQL is one of these."""

    user = "skyeye"

    def __init__(self, port: int | None = None, tcp: bool = True) -> None:
        if not pg_installed():
            raise AssertionError(f"PostgreSQL 15 is not installed at {PG_BIN} (Debian: apt-get install postgresql-15)")
        self.port = port or free_port()
        self.tcp = tcp
        # tempfile's folder, not pytest's: pytest's are root-only (the server runs as `postgres`
        # under root) and deep, while the socket's path must stay under ~100 characters
        self.folder = Path(tempfile.mkdtemp(prefix="skyeye-pg-"))
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            shutil.chown(self.folder, self.run_as, self.run_as)
        self.data = self.folder / "data"
        self._pg("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync")

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(PG_BIN / tool), *args], cwd=self.folder, user=self.run_as, capture_output=True,
                             text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out

    def start(self) -> "Postgres":
        listen = "127.0.0.1" if self.tcp else "''"
        options = f"-p {self.port} -c listen_addresses={listen} -k {self.folder} -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w",
                 "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def create_database(self, name: str) -> None:
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class ObjectStore(Service):
    """moto's S3 in server mode: in memory, so a restart starts empty (the tests only stop it
    to make it unreachable)."""

    name = "s3"

    def command(self) -> list[str]:
        return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def health_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_buckets(self, *names: str) -> None:
        import boto3
        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for name in names:
            s3.create_bucket(Bucket=name)

    def client_env(self) -> dict[str, str]:
        """What every S3 client here reads: boto3 (MLflow, DVC through s3fs) and pyarrow (Ray Train)."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}


class MlflowServer(Service):
    name = "mlflow"

    def __init__(self, folder: Path, env: dict, backend: str, artifacts: str, port: int | None = None) -> None:
        super().__init__(folder, env, port)
        self.backend, self.artifacts = backend, artifacts

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend, "--artifacts-destination",
                self.artifacts, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def health_url(self) -> str:
        return f"{self.url}/health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class PrefectServer(Service):
    name = "prefect"

    def __init__(self, folder: Path, env: dict, database_url: str, port: int | None = None) -> None:
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        env |= {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url, "PREFECT_HOME": str(folder / "prefect-home"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        super().__init__(folder, env, port)

    def command(self) -> list[str]:
        return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]

    def health_url(self) -> str:
        return f"{self.api}/health"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


class RayNode(Service):
    """One `ray start --block` node. The head takes the GCS port; a worker joins it with every
    port of its own (two nodes on one host collide on the defaults). All share one auth token."""

    def __init__(self, folder: Path, env: dict, num_cpus: int, head: "RayNode | None" = None) -> None:
        self.head = head
        self.name = "ray-head" if head is None else f"ray-worker-{free_port()}"
        super().__init__(folder, env)
        self.num_cpus = num_cpus

    def command(self) -> list[str]:
        cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus", str(self.num_cpus), "--disable-usage-stats",
               "--object-store-memory", str(150 * 1024**2), "--node-ip-address", "127.0.0.1"]
        if self.head is None:
            return [*cmd, "--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.folder / "ray")]
        ports = [free_port() for _ in range(6)]
        low = free_port()
        self.node_manager_port = ports[0]
        return [*cmd, "--address", self.head.address, "--node-manager-port", str(ports[0]),
                "--object-manager-port", str(ports[1]), "--dashboard-agent-grpc-port", str(ports[2]),
                "--dashboard-agent-listen-port", str(ports[3]), "--metrics-export-port", str(ports[4]),
                "--runtime-env-agent-port", str(ports[5]), "--min-worker-port", str(low),
                "--max-worker-port", str(low + 40)]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{(self.head or self).port}"

    def start(self, timeout: float = 120) -> "RayNode":
        self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.folder, start_new_session=True,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

        def joined() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` ended ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            alive = self.alive_node_ports()
            # a worker is known by its own node-manager port: a count of nodes can be fooled by a
            # lost node the head has not yet marked dead
            return bool(alive) if self.head is None else self.node_manager_port in alive
        try:
            wait_until(f"{self.name} joined", joined, timeout, 1)
        except AssertionError as err:
            raise AssertionError(f"{err}\nnodes the head knows: {self._nodes()}\n"
                                 f"{self.log.read_text()[-3000:]}") from None
        return self

    def alive_node_ports(self) -> set[int]:
        """The node-manager ports of the nodes the head's GCS holds alive."""
        return {port for port, state in self._nodes() if state == "ALIVE"}

    def _nodes(self) -> list[tuple[int, str]]:
        # the GCS asked directly (a fraction of a second), not through a driver's ray.init
        out = subprocess.run([str(BIN / "python"), "-c", _NODES, self.address], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"the GCS at {self.address} did not answer: {out.stderr[-500:]}")
        return [tuple(n) for n in json.loads(out.stdout)]

    def stop(self) -> None:
        # `ray start --block` passes SIGTERM on, but some of a head's processes outlive it for
        # good: 5 s, not 20, before the SIGKILL that ends them anyway
        stop_tree(self.proc, timeout=5)
        self.proc = None

    def kill(self) -> None:
        """The node dies at once, as a lost machine would."""
        stop_tree(self.proc, timeout=5, sig=signal.SIGKILL)
        self.proc = None


_NODES = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()
print(json.dumps([(n.node_manager_port, GcsNodeInfo.GcsNodeState.Name(n.state)) for n in nodes]))
"""


class TcpProxy:
    """A loopback TCP relay in front of a server, to make it unreachable (`cut`) without
    stopping it: what it stored stays there to be inspected."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        """Refuse new connections and drop the open ones, as a store that went away."""
        import socket
        self.open = False
        for s in [self.listener, *self.connections]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
