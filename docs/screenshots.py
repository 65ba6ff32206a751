"""Screenshots of a sweep in the MLflow UI, for docs/mlflow.md: a real ``mlflow server`` on 127.0.0.1 over the
sweep's SQLite store, pages opened in headless Chromium, PNGs saved, the server stopped.

    python docs/screenshots.py                      # runs a small gamma × rank sweep first (tiny model, ~2 min)
    python docs/screenshots.py --store sqlite:////abs/path/mlflow.db [--experiment loralab] [--out docs/img]

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and nothing else: Chromium is driven over the DevTools
protocol with the small websocket client below (standard library only), started with --headless --no-sandbox
--disable-gpu --disable-background-networking --disable-component-update --no-first-run and a fresh
--user-data-dir. Pages open with ``?workflowType=machine_learning``: MLflow 3.17's UI picks GenAI or Model training
by a switch it remembers per browser, so a fresh profile would otherwise show the GenAI overview.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from mlflow.tracking import MlflowClient

from loralab.data.demo import write_demo
from loralab.tracking.server import mlflow_server, stop

REPO = Path(__file__).resolve().parents[1]

WIDTH, HEIGHT = 1600, 1000
ML = "workflowType=machine_learning"  # MLflow 3.17's UI switch (GenAI | Model training), else remembered per browser


class DevTools:
    """The DevTools protocol over one websocket (RFC 6455, client side: masked text frames out)."""

    def __init__(self, ws_url: str):
        host_port, path = ws_url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))
        self.next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            buf += chunk
        return buf

    def _recv_message(self) -> dict[str, Any]:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            data += self._recv_exact(n)
            if b0 & 0x80:  # FIN: the last fragment
                return json.loads(data)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack(">H", n)
            if n < 65536
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        )
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:  # events arrive in between; skip them
            message = self._recv_message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_text(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while not self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.time() > deadline:
                raise TimeoutError(f"{text!r} never appeared on the page")
            time.sleep(0.5)

    def open(self, url: str, text: str) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(1)
        self.wait_text(text)
        time.sleep(2)  # charts and lazy columns settle

    def click_text(self, text: str, selector: str = "button,[role=button],[role=tab],a,span") -> bool:
        return bool(
            self.js(f"""(() => {{
            const el = [...document.querySelectorAll({json.dumps(selector)})]
                .find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
            if (el) el.click();
            return Boolean(el);
        }})()""")
        )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"saved {path} ({path.stat().st_size // 1024} KB)")
        return path


@contextlib.contextmanager
def chromium(tmp: Path, binary: str = "chromium") -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile; yields a DevTools connection to its page; always stopped."""
    profile = tmp / "chromium-profile"
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        f"--window-size={WIDTH},{HEIGHT}",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        yield tools
    finally:
        stop(proc)


def hide_assistant(tools: DevTools) -> None:
    """Close MLflow's assistant side panel and first-visit hints, which would cover the runs."""
    for label in ("Close", "Got it"):
        tools.js(f"""document.querySelectorAll('button[aria-label="{label}"]').forEach(b => b.click())""")
    tools.click_text("Got it")


def expand_children(tools: DevTools) -> None:
    """Unfold every sweep parent in the runs table (its children are collapsed under it)."""
    tools.js("""document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')
                .forEach(b => b.innerHTML.includes('M7.25 7.25V4.5') && b.click())""")  # the "+" icon: folded
    time.sleep(2)


def search_charts(tools: DevTools, text: str) -> None:
    """Type into the chart view's search box (a React input: set its value natively, then fire input)."""
    tools.js(f"""(() => {{
        const box = document.querySelector('input[placeholder="Search metric charts"]');
        if (!box) return;
        Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, {json.dumps(text)});
        box.dispatchEvent(new Event('input', {{bubbles: true}}));
    }})()""")
    time.sleep(2)


def take(store: str, experiment: str, out: Path, binary: str) -> list[Path]:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {store}")
    parents = client.search_runs(
        [exp.experiment_id], "tags.`loralab.role` = 'sweep'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not parents:
        raise SystemExit(f"no sweep in experiment {experiment!r}")
    parent = parents[0]
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(store, tmp) as url, chromium(Path(tmp), binary) as tools:
        exp_page = f"{url}/#/experiments/{exp.experiment_id}"
        tools.open(f"{exp_page}/runs?{ML}", parent.info.run_name)
        hide_assistant(tools)
        expand_children(tools)
        shots.append(tools.screenshot(out / "sweep_runs.png"))
        tools.open(f"{exp_page}/runs?{ML}&compareRunsMode=CHART", parent.info.run_name)
        expand_children(tools)
        search_charts(tools, "objective")
        shots.append(tools.screenshot(out / "sweep_charts.png"))
        tools.open(f"{exp_page}/runs/{parent.info.run_id}?{ML}", "Best")
        hide_assistant(tools)
        tools.click_text("Show more")
        time.sleep(1)
        shots.append(tools.screenshot(out / "sweep_parent.png"))
    return shots


def demo_sweep(tmp: Path) -> str:
    """A 3 × 2 gamma × rank grid on the tiny model and small demo data; returns its tracking URI. Runs in ``tmp``
    (its store, artifacts and sweep dir stay there) with this checkout as root, so runs carry its commit."""
    write_demo(tmp / "data", n_train=60, n_val=30)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "data=jsonl",
        f"data.train_file={tmp / 'data/train.jsonl'}",
        f"data.val_file={tmp / 'data/val.jsonl'}",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        "trainer.max_epochs=4",
        "export.zip=false",
        "lora=default",
        "loss.gamma=1.0,1.5,2.0",
        "lora.r=8,16",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORALAB_ROOT": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
    return uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--store",
        help="the sweep's tracking URI, e.g. sqlite:////abs/mlflow.db (default: run a demo sweep in a temporary dir)",
    )
    ap.add_argument("--experiment", default="loralab")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    ap.add_argument("--chromium", default="chromium", help="the browser binary")
    args = ap.parse_args(argv)
    if args.store:
        take(args.store, args.experiment, args.out, args.chromium)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        take(demo_sweep(Path(tmp)), args.experiment, args.out, args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
