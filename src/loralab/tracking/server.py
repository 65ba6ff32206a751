"""A real ``mlflow server`` on 127.0.0.1 over a tracking store, started and always stopped: what the UI screenshots
(``docs/screenshots.py``) and the REST tests open, exactly as a user would with ``mlflow server``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120  # the first start migrates the store's schema: slow on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers; raises when ``timeout_s`` passes or ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before {url} answered") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group (the server's workers too), SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def mlflow_server(store: str, work_dir: str | Path) -> Iterator[str]:
    """``mlflow server`` on a free 127.0.0.1 port over ``store``; yields its URL. New artifacts go to
    ``work_dir/artifacts`` (runs keep their own artifact locations), the log to ``work_dir/mlflow_server.log``."""
    work_dir = Path(work_dir)
    artifacts = work_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--default-artifact-root",
        str(artifacts),
        "--artifacts-destination",
        str(artifacts),
    ]
    url = f"http://127.0.0.1:{port}"
    with (work_dir / "mlflow_server.log").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(f"{url}/health", proc=proc)
            log.info("mlflow server at %s over %s", url, store)
            yield url
        finally:
            stop(proc)
