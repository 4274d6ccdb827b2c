"""What test modules share: servers, SSE reading, request and media builders, polling.

Test modules and conftest.py import from here; no test module imports from another, or
from conftest.

Two kinds of server:
- `ServerProcess`: `python main.py` in a subprocess, as operators run it; used for the
  main end-to-end suite and wherever a restart or a kill -9 is part of the test.
- `InProcessServer`: uvicorn in a thread of the test process with its own Settings;
  cheaper to start, and lets a test inject faults the real model cannot produce. Tests
  get one through the `make_server` / `make_module_server` fixtures (conftest.py).

Waiting is done on state (the session's GET status, /metrics, /health, log lines) with
`wait_until`, never by sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T = TypeVar("T")

# Three prompts, different on purpose: outputs pinned by the tests depend on the text.
SAY_HELLO = [{"role": "user", "content": "Say hello."}]  # the tiny model closes its think block on it
HI = [{"role": "user", "content": "hi"}]  # the shortest valid request
TELL_ME = [{"role": "user", "content": "Tell me something."}]  # a neutral prompt for long streams


# ----------------------------------------------------------------------------- waiting

def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} not reached within {timeout} s (last: {result!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base_url: str) -> dict:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).json()
    except httpx.HTTPError:
        return {}


def wait_ready(base_url: str, timeout: float = 90.0, want: str = "ready") -> dict:
    """Poll /health until its status is `want`; its body."""
    seen: list[dict] = [{}]

    def reached() -> dict | None:
        seen[0] = health(base_url)
        return seen[0] if seen[0].get("status") == want else None

    try:
        return wait_until(reached, timeout=timeout, interval=0.1, message=f"server at {base_url} {want}")
    except AssertionError:
        raise AssertionError(f"server at {base_url} not {want}: {seen[0]}") from None


# ----------------------------------------------------------------------------- servers

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
        # run from the log's folder, not the checkout: an operator's .env there must not leak in
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=self.log_path.parent, env=self.env,
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
        wait_until(lambda: self.server.started, timeout=30, interval=0.02, message="in-process server start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        """The app's internals: only for injecting faults a public route cannot cause."""
        return self.app.state.server


class ServerFactory:
    """Starts in-process servers on demand and closes every one of them at `close()`.

    A server loads its model at startup unless `preload_model=False` is passed, and is
    returned once /health says ready (a server that does not preload is returned as
    soon as it listens)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.servers: list[InProcessServer] = []

    def __call__(self, *, model_dir: Path | None = None, preload_model: bool = True, **settings) -> InProcessServer:
        server = InProcessServer(model_dir or self.model_dir, preload_model=preload_model, **settings)
        self.servers.append(server.__enter__())
        if preload_model:
            wait_ready(server.base_url)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):
            server.__exit__(None, None, None)
        self.servers.clear()


# ----------------------------------------------------------------------------- requests

def post(base_url: str, body, **kw) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60, **kw)


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The response is an OpenAI-shaped error with this status (and code, param when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def long_request(**extra) -> dict:
    """A request that decodes a fixed, long run of tokens (random weights rarely say EOS)."""
    return {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 3000,
            "ignore_eos": True, "seed": 7, "temperature": 1.0, "stream": True, **extra}


def get_completion(base_url: str, session_id: str) -> dict:
    """The session's GET body (status, usage, text so far)."""
    response = httpx.get(f"{base_url}/v1/chat/completions/{session_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def session_body(base_url: str, session_id: str) -> dict:
    """The session's GET body, or {} while the session does not exist yet."""
    response = httpx.get(f"{base_url}/v1/chat/completions/{session_id}", timeout=30)
    return response.json() if response.status_code == 200 else {}


def wait_status(base_url: str, session_id: str, statuses: set[str], timeout: float = 30) -> dict:
    """Poll the session's GET until its status is one of `statuses`; that body."""
    def reached() -> dict | None:
        body = get_completion(base_url, session_id)
        return body if body["status"] in statuses else None

    return wait_until(reached, timeout=timeout, message=f"{session_id} in {statuses}")


def wait_generating(base_url: str, session_id: str, timeout: float = 30) -> dict:
    """Poll the session's GET until it exists, is in progress and has produced some text."""
    def generating() -> dict | None:
        body = session_body(base_url, session_id)
        if body.get("status") != "in_progress":
            return None
        message = body["choices"][0]["message"]
        return body if message["content"] or message["reasoning_content"] else None

    return wait_until(generating, timeout=timeout, message=f"{session_id} generating")


# ----------------------------------------------------------------------------- SSE

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


def final_choice(events: list[dict]) -> dict:
    """The choice of the last chunk before [DONE] (the one carrying finish_reason)."""
    return json.loads(events[-2]["data"])["choices"][0]


# ----------------------------------------------------------------------------- metrics

def scrape(base_url: str) -> dict[tuple, float]:
    """Every sample of GET /metrics, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(base_url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric(base_url: str, name: str, **labels) -> float:
    """One sample read from /metrics now (0 when absent)."""
    return value(scrape(base_url), name, **labels)


# ----------------------------------------------------------------------------- media

def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(size=(64, 64), color=(10, 200, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(size=(96, 64), color=(200, 30, 30)) -> str:
    return data_uri(png_bytes(size, color), "image/png")


def mp4_bytes(frames: int = 12, size: int = 64) -> bytes:
    """A small mpeg4 clip written with PyAV (its bundled FFmpeg always has that codec)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * 20 % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def mp4_data_uri(frames: int = 12, size: int = 64) -> str:
    return data_uri(mp4_bytes(frames, size), "video/mp4")


def break_decode_step(state, at: int) -> list:
    """Make the `at`-th pass through the text model (each prefill chunk and each decode
    step ends in its final norm) raise: a fault the real model does not produce. Returns
    the call list (clear it to count again)."""
    norm = state.models.model.model.language_model.norm
    original, calls = norm.forward, []

    def broken_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError("device fell off the bus")
        return original(*args, **kwargs)

    norm.forward = broken_forward
    return calls


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]


def video_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]


# ----------------------------------------------------------------------------- redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """`redis-server` on a free port in its own directory; stop() and start() keep both, so
    a restart is the same server to clients (and, when persistent, keeps its data).

    `--stream-node-max-entries 16` makes `MAXLEN ~ n` trim within a few hundred events."""

    def __init__(self, directory: Path, persistent: bool = False):
        self.directory, self.persistent = directory, persistent
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import redis

        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.directory), "--stream-node-max-entries", "16", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.02)
        raise AssertionError(f"redis-server on {self.port} did not start")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2)


class Replica:
    """One server replica as the Redis store sees it: its own clients, writer thread and
    agent thread, on the test's event loop. `cancelled` records when each cancel reached it."""

    def __init__(self, url: str, *, capacity: int = 1000, ttl: float = 60.0, lease: float = 1.0, beat: float = 0.25,
                 block: float = 0.5, degrade_after: float | None = 0.5, agent: bool = True):
        import main

        loop = asyncio.get_running_loop()
        self.rid, self.capacity = main.new_replica_id(), capacity
        self.cancelled: dict[str, float] = {}
        self.sessions = main.RedisSessions(url, self.rid, capacity=capacity, ttl=ttl, lease=lease, block=block)
        self.writer = main.RedisWriter(url, loop, self.rid, ttl=ttl, on_cancel=self._on_cancel,
                                       degrade_after=degrade_after)
        self.agent = main.ReplicaAgent(url, self.rid, loop, self._on_cancel, lease=lease, beat=beat)
        if agent:
            self.agent.start()

    def _on_cancel(self, key: str) -> None:
        self.cancelled.setdefault(key, time.monotonic())

    async def create(self, key: str, meta: dict | None = None):
        import main

        await self.sessions.reserve(key, key_hash="kh", meta=meta)
        return main.RedisSessionLog(key, self.capacity, writer=self.writer, sessions=self.sessions)

    def crash(self) -> None:
        """Stop the heartbeat without a word, as a killed process would: the lease lapses."""
        self.agent.stopping.set()
        self.agent.thread.join(5)

    async def close(self) -> None:
        self.writer.close()
        if self.agent.thread.is_alive():
            self.agent.close()
        await self.sessions.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """wait_until for coroutines: poll state on the loop; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def deliver(log, datas: list[str]) -> None:
    """One outbox delivery: appends in one loop iteration, then let the loop turn."""
    for data in datas:
        log.append(data)
    await asyncio.sleep(0)


async def collect(events) -> list:
    return [event async for event in events]


def stored(client, key: str) -> list[tuple[str, int, str]]:
    """(entry id, index field, data) of every entry of a session's stream."""
    import main

    return [(i.decode(), int(f[b"i"]), f[b"d"].decode()) for i, f in client.xrange(main.events_key(key))]
