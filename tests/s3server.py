"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`) on 127.0.0.1.

One process runs a master, a volume server, a filer, the S3 gateway and an admin server, each (and
its gRPC port) on a free loopback port, with its data in a temp folder and S3 authentication on:
one identity (``ACCESS_KEY``/``SECRET_KEY``, every action), so unsigned or wrongly signed requests
are refused as on AWS. The binary comes from ``MERGEIT_WEED`` or the cache folder that
``scripts/build-weed.sh`` (``make weed``) builds it into.

    with S3Server() as s3:
        s3.make_bucket("data")
        subprocess.run([...], env={**os.environ, **s3.env()})
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "mergeit-test"
SECRET_KEY = "mergeit-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build-weed.sh"
# the services `weed mini` starts; each gets an HTTP and a gRPC port
_SERVICES = ("master", "volume", "filer", "s3", "admin")
# what weed says when a port it was given was taken between our pick and its bind
_PORT_TAKEN = re.compile(r"is not available on|address already in use")


def weed_binary() -> Path:
    """``MERGEIT_WEED``, else where scripts/build-weed.sh puts the binary (the version is read from
    the script, so the two never disagree)."""
    if os.environ.get("MERGEIT_WEED"):
        path = Path(os.environ["MERGEIT_WEED"])
    else:
        version = re.search(r"^WEED_VERSION=(\S+)", BUILD_SCRIPT.read_text(), re.M)[1]
        folder = os.environ.get("MERGEIT_WEED_DIR") or Path.home() / ".cache" / "mergeit-spark" / f"weed-{version}"
        path = Path(folder) / "weed"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(f"SeaweedFS binary {path} missing: run make weed (scripts/build-weed.sh)")
    return path


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """Starts SeaweedFS's S3 gateway on 127.0.0.1 (``start``/``stop``, or as a context manager)."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self, binary: str | Path | None = None, start_timeout: float = 60.0):
        self.binary = Path(binary) if binary else weed_binary()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.tmp: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point a child process (boto3, pyarrow, Spark's s3a via the default
        credential chain) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client with path-style addressing (no bucket.127.0.0.1 host names); other
        keys than the server's for tests of refused credentials."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def command(self) -> list[str]:
        """``weed mini``: master, volume server, filer, S3 gateway and an admin server in one
        process, tuned for one small node (it starts taking writes ~1 s after S3 answers, where
        `weed server -s3` takes ~9 s and hangs 15 s on SIGTERM). Everything on loopback, small
        volumes, no telemetry, and none of the extra listeners (WebDAV, Iceberg, Lance, admin UI
        and its legacy port) that it would otherwise open on fixed ports."""
        p, tmp = self.ports, self.tmp
        return [
            str(self.binary), "-logtostderr", "mini",
            f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={tmp / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={tmp / 'filer.sock'}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={tmp / 's3.json'}", f"-s3.localSocket={tmp / 's3.sock'}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            "-admin.port.legacy=0", "-admin.ui=false", "-webdav=false",
        ]

    def start(self) -> S3Server:
        """Starts the server and waits until a signed ListBuckets succeeds; on a port lost to a
        race with another process, tries again on new ports."""
        for attempt in range(3):
            self.tmp = Path(tempfile.mkdtemp(prefix="mergeit-s3-"))
            (self.tmp / "data").mkdir()
            identity = {"name": "mergeit-test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
            (self.tmp / "s3.json").write_text(json.dumps({"identities": [identity]}))
            names = [n + suffix for n in _SERVICES for suffix in ("", ".grpc")]
            self.ports = dict(zip(names, _free_ports(len(names))))
            # No AWS_* from our environment (weed would add them as a second admin identity) nor
            # WEED_* settings; HOME and the working folder are the temp folder, so no
            # ~/.seaweedfs/*.toml or ./*.toml is read.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
            env["HOME"] = str(self.tmp)
            self._log = open(self.tmp / "weed.log", "wb")
            self.process = subprocess.Popen(self.command(), cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
                                            stdout=self._log, stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
                return self
            except BaseException as exc:  # never leave weed running behind a failed start
                lost_port = isinstance(exc, RuntimeError) and _PORT_TAKEN.search(self.log_tail(200))
                self.stop()
                if not lost_port or attempt == 2:
                    raise
        return self

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        client, deadline = self.client(), time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 at {self.endpoint} not ready after {self.start_timeout:.0f} s "
                                       f"({exc}):\n{self.log_tail()}") from exc
                time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.tmp / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def stop(self) -> None:
        """Terminates weed (SIGTERM, SIGKILL after 10 s: the data is thrown away anyway), then
        removes the temp folder and the gRPC sockets weed makes in /tmp under fixed names."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
            self._log.close()
            for name in _SERVICES:
                Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.grpc']}.sock").unlink(missing_ok=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
