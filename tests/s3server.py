"""Real S3-protocol servers on loopback for the store tests (and the benchmark).

- `MotoS3`: moto's ThreadedMotoServer on 127.0.0.1 at a free port; boto3 talks HTTP to it.
- `SlowDownServer`: a tiny HTTP server that answers every request with 503 SlowDown
  (what S3 says when throttling), counting the requests, to see botocore retry and give up.
- `scrubbed_aws_env()`: an environment with fake credentials and no AWS config files, so
  no test can reach a real account by accident.

Fixtures `moto_s3` (session) and `slowdown_s3` are defined here; import them into a test
module (`from tests.s3server import moto_s3, slowdown_s3  # noqa: F401`) or a conftest.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

FAKE_KEY_ID = "AKIAKILNTESTFAKE0000"
FAKE_SECRET = "kiln-fake-secret-for-tests-only-0123456789"
REGION = "us-east-1"

_AWS_VARS = [k for k in os.environ if k.startswith("AWS_")] + [
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "KILN_S3_ENDPOINT_URL"]

# What the developer's shell held before scrubbing: the external-endpoint tests use it.
ORIGINAL_ENV = {k: os.environ[k] for k in set(_AWS_VARS) if k in os.environ}


def scrubbed_aws_env() -> dict[str, str | None]:
    """Env changes (None = unset) that cut every path to real AWS credentials."""
    env: dict[str, str | None] = {k: None for k in set(_AWS_VARS)}
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE="/nonexistent/kiln-test/aws-config",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/kiln-test/aws-credentials",
               AWS_EC2_METADATA_DISABLED="true")
    return env


@contextlib.contextmanager
def patched_env(changes: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 in a thread on loopback. Auth is off (moto's default) except inside
    `enforce_auth()`, where every request must be signed by a known IAM key."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> "MotoS3":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self, **kwargs):
        """A raw boto3 client to act behind the store's back."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"), **kwargs)

    def new_bucket(self, prefix: str = "kiln") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _reset_auth(self, count: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    @contextlib.contextmanager
    def enforce_auth(self):
        """moto checks signatures against its IAM users (none exist): every key is unknown."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")


class SlowDownServer:
    """Answers every request with 503 SlowDown, like a throttling S3; counts requests."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                with outer._lock:
                    outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message>"
                        b"<RequestId>KILNTEST</RequestId></Error>")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> "SlowDownServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server for the whole session, with the AWS environment scrubbed."""
    with patched_env(scrubbed_aws_env()):
        server = MotoS3().start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def aws_env_scrubbed():
    """Fake credentials, no AWS config files, no endpoint or profile from the shell."""
    with patched_env(scrubbed_aws_env()):
        yield


@pytest.fixture
def slowdown_s3(aws_env_scrubbed):
    server = SlowDownServer().start()
    try:
        yield server
    finally:
        server.stop()
