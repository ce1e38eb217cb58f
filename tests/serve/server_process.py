"""`ServerProcess`: `fmoe serve` in a child process on a free loopback port, for the tests
(and `tools/bench_serve.py`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`fmoe serve MODEL *args` in a child process on a free loopback port; waits for /health.

        with ServerProcess(path, "--max-batch", "8") as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")
    """

    def __init__(self, model, *args: str, env: dict | None = None, timeout: float = 180.0,
                 host: str = "127.0.0.1", log_path: str | os.PathLike | None = None):
        self.model, self.args, self.host, self.timeout = str(model), list(args), host, timeout
        self.env = dict(os.environ, **(env or {}))
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> "ServerProcess":
        import tempfile
        import urllib.request

        for attempt in range(3):
            self.port = free_port(self.host)
            self._log = (open(self.log_path, "w+") if self.log_path
                         else tempfile.TemporaryFile("w+"))
            cmd = [sys.executable, "-m", "fmoe.serve.cli", "serve", self.model, "--host", self.host,
                   "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.2)
            out = self.output()
            self.stop()
            if "cannot listen" in out and attempt < 2:
                continue              # someone took the port in between: try another
            raise RuntimeError(f"fmoe serve did not become healthy:\n{out[-4000:]}")
        raise RuntimeError("fmoe serve: no free port")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
