"""Servers the tests start as real processes: a local S3-compatible server (moto's standalone
server, from the test extra), ``flexunet search dashboard`` and ``flexunet search proxy``."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import ctrl_c_as_from_a_terminal


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1, on a free port; ``env`` is what a client needs (the usual
    AWS variables), for the subprocesses that use it. Nothing is set in this process."""

    def __init__(self, log: Path, attempts: int = 3) -> None:
        for _ in range(attempts):  # another process may take the free port before moto binds it
            port = _free_port()
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=log.open("w"), stderr=subprocess.STDOUT)
            self.endpoint = f"http://127.0.0.1:{port}"
            if self._answers(timeout=60):
                break
            self.stop()
        else:
            raise AssertionError(f"moto's S3 server did not start: {log.read_text()}")
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "flexunet-test",
                    "AWS_SECRET_ACCESS_KEY": "flexunet-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def _answers(self, timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=5):
                    return True
            except urllib.error.HTTPError:
                return True  # it answers, if only to say no
            except OSError:
                time.sleep(0.3)
        return False

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``: key -> content."""
        client = self.client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Dashboard:
    """``flexunet search dashboard`` in a subprocess; ``url`` is the page it says to open."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "flexunet.cli", "search", "dashboard", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
                                     preexec_fn=ctrl_c_as_from_a_terminal)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url(timeout=60)
        self.base = re.match(r"http://[^/]+", self.url).group(0)  # type: ignore[union-attr]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.time() + timeout
        seen = []
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            found = re.search(r"open (http://\S+)", line)
            if found:
                return found.group(1)
        self.stop()
        raise AssertionError(f"the dashboard did not start: {''.join(seen)} {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=30) as answer:
            return answer.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Proxy:
    """``flexunet search proxy`` of the database ``database`` on a free port of 127.0.0.1, to kill
    (SIGKILL) and start again on the same port; ``url`` is what workers pass as --storage."""

    def __init__(self, database: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.database, self.log, self.env = database, log, env or {}
        self.port = _free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 60) -> None:
        with self.log.open("a", encoding="utf-8") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "flexunet.cli", "search", "proxy", "--storage",
                                          self.database, "--port", str(self.port)], stdout=handle,
                                         stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the proxy did not start: {self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
