"""A real S3 API server on loopback for tests: moto's server mode, started in a temp dir on a free
port and stopped by its PID (its own process group), plus a throttling proxy in front of it.

Bind the fixtures in a test module: `s3_server, s3_env = s3server.s3_server, s3server.s3_env`.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REGION = "us-east-1"
TEST_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class S3Server:
    url: str
    pid: int

    def boto3(self, **keys: str):
        """A boto3 client for arranging test data (not the code under test)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=keys.get("AWS_ACCESS_KEY_ID", "testing"),
                            aws_secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY", "testing"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(workdir: Path) -> subprocess.Popen:
    """moto_server on a free loopback port, logging into workdir; `.url` is set on the process."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server is not installed; pip install -e '.[test]' (it brings moto[server]).")
    for _ in range(5):  # a port picked free can be taken by another process before moto binds it
        port = _free_port()
        log = open(workdir / f"moto-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MOTO_CALL_RESET_API": "false"})
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
                    return proc
            except OSError:
                time.sleep(0.1)
        stop_moto(proc)
    raise RuntimeError(f"moto_server did not start; see {workdir}")


def stop_moto(proc: subprocess.Popen) -> None:
    """Stop the server we started, by its process group (moto_server is its group leader)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One moto server for the session (no authentication: any key is accepted)."""
    proc = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield S3Server(proc.url, proc.pid)  # type: ignore[attr-defined]
    finally:
        stop_moto(proc)


def client_env(url: str, **keys: str) -> dict[str, str]:
    """The environment a user would set for an S3-compatible endpoint, isolated from ~/.aws."""
    return {**TEST_KEYS, **keys, "AWS_ENDPOINT_URL": url, "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """Point the standard AWS_* environment at the loopback server for one test."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ALLOW_HTTP", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in client_env(s3_server.url).items():
        monkeypatch.setenv(name, value)
    return s3_server


class ThrottlingProxy:
    """Answers the next `fail` requests with 503 SlowDown, then forwards to the real server; counts
    requests (`seen`), logs each as (method, path, Range header) in `log`, and counts the body bytes it
    relays back (`bytes_out`)."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream: str) -> None:
        self.fail = 0
        self.seen = 0
        self.bytes_out = 0
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.seen += 1
                    proxy.log.append((self.command, self.path, self.headers.get("Range")))
                    throttle = proxy.fail > 0
                    proxy.fail -= throttle
                if throttle:
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.BODY)))
                    self.end_headers()
                    self.wfile.write(proxy.BODY)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                with proxy._lock:
                    proxy.bytes_out += len(data)
                head = self.command == "HEAD"  # a HEAD's Content-Length is the object's, not the body's
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
