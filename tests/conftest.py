"""Shared fixtures: one tiny real checkpoint per test session, and servers on 127.0.0.1.

Two kinds of server:
- `ServerProcess`: `python main.py` in a subprocess, as operators run it; used for the
  main end-to-end suite and wherever a restart or a kill -9 is part of the test.
- `InProcessServer`: uvicorn in a thread of the test process with its own Settings;
  cheaper to start, and lets a test inject faults the real model cannot produce.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 90.0, want: str = "ready") -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{base_url}/health", timeout=2).json()
            if last.get("status") == want:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server at {base_url} not {want}: {last}")


class ServerProcess:
    """`python main.py` with the given environment, on a free port."""

    def __init__(self, model_dir: Path, log_path: Path, **env: str):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MODEL_REPO_ID": str(model_dir), "HOST": "127.0.0.1", "PORT": str(self.port),
                    "PRELOAD_MODEL": "1", "LOG_LEVEL": "info", **{k: str(v) for k, v in env.items()}}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_ready(self.base_url)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class InProcessServer:
    """uvicorn serving create_app(Settings(...)) in a background thread."""

    def __init__(self, model_dir: Path, **overrides):
        import uvicorn

        import main

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        settings = main.Settings(_env_file=None, model_repo_id=str(model_dir), host="127.0.0.1", port=self.port,
                                 **overrides)
        self.app = main.create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "in-process server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """The main end-to-end server: `python main.py` with default settings."""
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.base_url


# ----------------------------------------------------------------------------- SSE helpers

def parse_sse(lines) -> list[dict]:
    """SSE events as dicts {id, data}; comments (keep-alive pings) are dropped."""
    events, current = [], {}
    for line in lines:
        if line == "":
            if "data" in current:
                events.append(current)
            current = {}
        elif line.startswith(":") or line.startswith("retry:"):  # comments and the reconnect delay
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current[name] = current[name] + "\n" + value if name == "data" and name in current else value
    if "data" in current:
        events.append(current)
    return events


def stream_events(base_url: str, body: dict | None = None, *, method: str = "POST", path: str = "/v1/chat/completions",
                  headers: dict | None = None, limit: int | None = None, params: dict | None = None):
    """Open an SSE stream and read it to the end, or only `limit` events then disconnect.

    Returns (response headers, status code, events)."""
    events: list[dict] = []
    with httpx.Client(timeout=60) as client:
        with client.stream(method, base_url + path, json=body, headers=headers, params=params) as response:
            if response.status_code != 200:
                response.read()
                return response.headers, response.status_code, [response.json()]
            current: list[str] = []
            for line in response.iter_lines():
                current.append(line)
                if line == "":
                    events.extend(parse_sse(current))
                    current = []
                    if limit is not None and len(events) >= limit:
                        break
            events.extend(parse_sse(current))
            return response.headers, response.status_code, events


def chunk_payloads(events: list[dict]) -> list:
    """What a client reads from each event, less the per-run chunk id and timestamp."""
    out = []
    for event in events:
        if event["data"] == "[DONE]":
            out.append("[DONE]")
            continue
        data = json.loads(event["data"])
        out.append({k: v for k, v in data.items() if k not in ("id", "created")})
    return out


def joined_text(events: list[dict], field: str = "content") -> str:
    parts = []
    for event in events:
        if event["data"] != "[DONE]":
            for choice in json.loads(event["data"]).get("choices", []):
                parts.append(choice["delta"].get(field) or "")
    return "".join(parts)


def event_index(event: dict) -> int:
    return int(event["id"].rsplit(":", 1)[1])


def long_request(**extra) -> dict:
    """A request that decodes a fixed, long run of tokens (random weights rarely say EOS)."""
    return {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
            "ignore_eos": True, "seed": 7, "temperature": 1.0, "stream": True, **extra}
