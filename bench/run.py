"""One command, one run: the server against raw `generate` (and `transformers serve` when installed).

    python bench/run.py                  # tiny checkpoint built on the fly
    MODEL_REPO_ID=/path/to/model python bench/run.py --reps 5
    python bench/run.py --quick          # smoke run (used by the test suite)
    python bench/run.py --redis          # SESSION_STORE=redis against memory and raw (needs redis-server)
    python bench/run.py --gpu-config     # the engine at Qwen3-VL-2B size on a GPU (bench/gpu.py)

Writes bench/results/latest.json and latest.md (a markdown table) and prints the table.
Every figure is the median of --reps repetitions, shown next to its reference as a ratio.
Servers run as separate processes on 127.0.0.1, as operators run them; the client runs in
this process, on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tests"))

from workload import chat_body, long_prompt_body, video_body  # noqa: E402


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port: ours (`python main.py`) or `transformers serve`."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, model_name: str,
                 unsupported: tuple[str, ...] = ()):
        self.name, self.cmd, self.env, self.port, self.model_name = name, cmd, env, port, model_name
        self.unsupported = unsupported  # request fields the server refuses (422); random weights rarely say EOS
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = open(Path(tempfile.gettempdir()) / f"bench-{name}-{port}.log", "wb")
        self.proc: subprocess.Popen | None = None

    @classmethod
    def ours(cls, model: str, **env) -> "Server":
        port = free_port()
        full_env = {**os.environ, "MODEL_REPO_ID": model, "HOST": "127.0.0.1", "PORT": str(port),
                    "PRELOAD_MODEL": "1", "LOG_LEVEL": "warning", "MAX_QUEUE": "64", **env}
        name = "ours-sqlite" if env.get("PERSIST_SESSIONS") == "1" else f"ours-{env.get('SESSION_STORE', 'memory')}"
        name += f"-b{env['MAX_BATCH_SIZE']}" if "MAX_BATCH_SIZE" in env else ""
        return cls(name, [sys.executable, str(ROOT / "main.py")], full_env, port, model)

    @classmethod
    def transformers_serve(cls, model: str) -> "Server":
        port = free_port()
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]
        return cls("transformers-serve", cmd, dict(os.environ), port, model,
                   unsupported=("top_k", "min_tokens", "ignore_eos"))

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited; see {self.log.name}"
            try:
                health = httpx.get(self.base_url + "/health", timeout=2)
                if health.status_code == 200 and health.json().get("status") in ("ready", "ok", "healthy", None):
                    self._warm_up()
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready")

    def _warm_up(self) -> None:
        asyncio.run(stream_once(self, chat_body(8)))

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def proc_status(self) -> dict:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


# ----------------------------------------------------------------------------- one stream

# A data line carries text when a text field holds a non-empty string. Only lines naming
# "usage" are parsed as JSON: json.loads of every chunk took 6.5 us a line against 1.6 us
# for this test (one 280-byte chunk, 2 cores), and the client shares the cores with the
# server. A quote inside text is escaped (\"), so text cannot fake a field name.
TEXT_FIELD = re.compile(r'"(?:content|reasoning_content|reasoning)"\s*:\s*"[^"]')


async def stream_once(server: Server, body: dict, client: httpx.AsyncClient | None = None,
                      headers: dict | None = None, method: str = "POST", path: str = "/v1/chat/completions",
                      params: dict | None = None, on_text: Callable[[float], None] | None = None) -> dict:
    """Send one request and time it: first generated text, first byte, last byte, tokens.
    `on_text` gets the arrival time of every event that carries text."""
    own = client is None
    client = client or httpx.AsyncClient(timeout=600)
    # serialized before the clock starts: encoding a 270 KB image body is the client's cost
    content = json.dumps({**{k: v for k, v in body.items() if k not in server.unsupported},
                          "model": server.model_name}).encode() if body else None
    headers = {**(headers or {}), "Content-Type": "application/json"}
    started = time.perf_counter()
    first_byte = first_text = None
    usage: dict = {}
    events = text_chunks = 0  # a peer without usage chunks is counted a chunk a token
    try:
        async with client.stream(method, server.base_url + path, content=content, headers=headers, params=params) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                first_byte = first_byte or time.perf_counter()
                if not line.startswith("data:"):
                    continue
                events += 1
                data = line[5:].lstrip()
                if data == "[DONE]":
                    break
                if '"usage"' in data:
                    usage = json.loads(data).get("usage") or usage
                if TEXT_FIELD.search(data):
                    now = time.perf_counter()
                    first_text = first_text or now
                    text_chunks += 1
                    if on_text:
                        on_text(now)
    finally:
        if own:
            await client.aclose()
    done = time.perf_counter()
    return {"started": started, "ttft": (first_text or done) - started, "first_byte": (first_byte or done) - started,
            "total": done - started, "tokens": usage.get("completion_tokens") or text_chunks,
            "prompt_tokens": usage.get("prompt_tokens", 0), "events": events}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- the measurements

def p1_throughput(server: Server, reps: int, tokens: int) -> dict:
    runs = [asyncio.run(stream_once(server, chat_body(tokens, seed=i))) for i in range(reps)]
    counted = [r["tokens"] or tokens for r in runs]
    return {"tokens_per_s": median([n / r["total"] for n, r in zip(counted, runs)]), "tokens": median(counted)}


def p2_ttft(server: Server, reps: int) -> dict:
    text = [asyncio.run(stream_once(server, chat_body(1, seed=i)))["ttft"] for i in range(reps * 3)]
    image = [asyncio.run(stream_once(server, chat_body(1, image=True, seed=i)))["ttft"] for i in range(reps * 3)]
    return {"text_ms": median(text) * 1000, "image_ms": median(image) * 1000}


async def concurrent(server: Server, streams: int, tokens: int, arrivals: list[float] | None = None) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def one(i: int) -> dict:
            if arrivals:
                await asyncio.sleep(arrivals[i])
            return await stream_once(server, chat_body(tokens, seed=i), client)

        started, cpu = time.perf_counter(), time.process_time()
        runs = await asyncio.gather(*(one(i) for i in range(streams)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    ttfts = [r["ttft"] * 1000 for r in runs]
    total_tokens = sum(r["tokens"] or tokens for r in runs)
    return {"streams": streams, "aggregate_tokens_per_s": total_tokens / wall,
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95),
            "client_cpu_share": cpu / wall}  # of one core: what the client took from the server


def medians(runs: list[dict]) -> dict:
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def p3_streams(server: Server, reps: int, tokens: int, counts: tuple[int, ...]) -> dict:
    return {f"c{streams}": medians([asyncio.run(concurrent(server, streams, tokens)) for _ in range(reps)])
            for streams in counts}


WIDE_BATCH = 16  # MAX_BATCH_SIZE of the second server (P3 with 16 streams)


def p3_concurrency(server: Server, reps: int, tokens: int) -> dict:
    out = p3_streams(server, reps, tokens, (1, 4, 8))
    rng = random.Random(42)
    arrivals = sorted(rng.uniform(0, 2.0) for _ in range(8))
    out["random_arrivals_8"] = medians([asyncio.run(concurrent(server, 8, tokens, arrivals)) for _ in range(reps)])
    return out


JOIN_STREAMS = 8  # P7: streams decoding when the long prompt arrives
JOIN_AFTER_EVENTS = 16  # each has sent this many text events after its first before the join
JOIN_MAX_TOKENS = 8  # what the long request generates
TOKEN_LATENCY = "qwen_time_per_output_token_seconds"  # the server's histogram (/metrics)


class JoinWatch:
    """Arrival times of the running streams' text events; `decoding` is set once every
    stream has had JOIN_AFTER_EVENTS text events after its first one."""

    def __init__(self, streams: int):
        self.marks: list[list[float]] = [[] for _ in range(streams)]
        self.short = streams
        self.decoding = asyncio.Event()

    def recorder(self, i: int) -> Callable[[float], None]:
        marks = self.marks[i]

        def record(now: float) -> None:
            marks.append(now)
            if len(marks) == JOIN_AFTER_EVENTS + 1:
                self.short -= 1
                if not self.short:
                    self.decoding.set()
        return record


async def join_once(server: Server, tokens: int, long_body: dict) -> dict:
    """JOIN_STREAMS streams of `tokens` tokens; once all are decoding, one long prompt joins."""
    watch = JoinWatch(JOIN_STREAMS)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def running(i: int) -> dict:
            try:
                return await stream_once(server, chat_body(tokens, seed=i), client, on_text=watch.recorder(i))
            finally:
                watch.decoding.set()  # a stream that ends first must not leave the join waiting

        streams = [asyncio.create_task(running(i)) for i in range(JOIN_STREAMS)]
        await watch.decoding.wait()
        joiner = await stream_once(server, long_body, client)
        await asyncio.gather(*streams)
    return join_figures(watch.marks, joiner)


def join_figures(marks: list[list[float]], joiner: dict) -> dict:
    """Gaps between a stream's consecutive text events: before the join (from the moment
    all streams are decoding to the long request's send) and during it (overlapping the
    time from the send to the long request's first text)."""
    sent = joiner["started"]
    first = sent + joiner["ttft"]
    all_decoding = max((m[0] for m in marks if m), default=sent)
    before, during = [], []
    for m in marks:
        for a, b in zip(m, m[1:]):
            if all_decoding <= a and b <= sent:
                before.append(b - a)
            elif b > sent and a < first:
                during.append(b - a)
    return {"prompt_tokens": joiner["prompt_tokens"], "joiner_ttft_ms": joiner["ttft"] * 1000,
            "gap_p99_before_ms": percentile(before, 0.99) * 1000, "gap_p99_during_ms": percentile(during, 0.99) * 1000,
            "gap_max_during_ms": max(during, default=float("nan")) * 1000,
            "gaps_before": len(before), "gaps_during": len(during),
            "streams_through_join": sum(1 for m in marks if m and m[-1] > first)}


def long_prompt_repeats(server: Server, target: int) -> int:
    """Repeats of the long prompt's words that make about `target` prompt tokens on this
    server's tokenizer, from two untimed requests (which also warm up a long prefill)."""
    few, many = 4, 40
    counts = [asyncio.run(stream_once(server, long_prompt_body(n, 1, seed=900 + n)))["prompt_tokens"]
              for n in (few, many)]
    per_repeat = (counts[1] - counts[0]) / (many - few)
    return max(1, round(few + (target - counts[0]) / per_repeat))


def token_latency_buckets(server: Server) -> dict[float, float]:
    """The server's time-per-output-token histogram, cumulative count by upper bound (s);
    empty when /metrics has none."""
    buckets = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(TOKEN_LATENCY + "_bucket{"):
            buckets[float(line.split('le="', 1)[1].split('"', 1)[0])] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_bound_ms(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket that holds quantile `q` of what was observed between two
    scrapes (q=1: the bucket of the longest)."""
    counts = {le: after[le] - before.get(le, 0) for le in sorted(after)}
    total = counts.get(math.inf, 0)
    return next(le for le, n in counts.items() if n >= q * total) * 1000 if total else float("nan")


def p7_join(server: Server, reps: int, tokens: int, prompt_tokens: int) -> dict:
    """A ~`prompt_tokens` prompt joins JOIN_STREAMS decoding streams, `reps` times."""
    repeats = long_prompt_repeats(server, prompt_tokens)
    before = token_latency_buckets(server)
    runs = [asyncio.run(join_once(server, tokens, long_prompt_body(repeats, JOIN_MAX_TOKENS, seed=1000 + rep)))
            for rep in range(reps)]
    after = token_latency_buckets(server)
    out = medians(runs)
    return {**out, "streams": JOIN_STREAMS, "stream_tokens": tokens, "repeats": repeats,
            "gap_ratio": out["gap_p99_during_ms"] / out["gap_p99_before_ms"],
            "server_token_latency_p99_ms": bucket_bound_ms(before, after, 0.99),
            "server_token_latency_max_ms": bucket_bound_ms(before, after, 1.0), "runs": runs}


def p7_video_join(server: Server, reps: int, tokens: int) -> dict:
    """A video request (workload.video_body) joins JOIN_STREAMS decoding streams, `reps` times:
    its frames go through the vision encoder in one piece, its prompt in chunks."""
    asyncio.run(stream_once(server, video_body(1, seed=1999)))  # untimed: warms up the video path
    runs = [asyncio.run(join_once(server, tokens, video_body(JOIN_MAX_TOKENS, seed=2000 + rep)))
            for rep in range(reps)]
    out = medians(runs)
    return {**out, "streams": JOIN_STREAMS, "stream_tokens": tokens,
            "gap_ratio": out["gap_p99_during_ms"] / out["gap_p99_before_ms"], "runs": runs}


def p4_resume(server: Server, reps: int, events: int) -> dict:
    body = chat_body(events, session_id=f"bench-replay-{time.time_ns()}")
    made = asyncio.run(stream_once(server, body))
    sid = body["session_id"]
    replays = [asyncio.run(stream_once(server, None, method="GET", path=f"/v1/chat/completions/{sid}",
                                       params={"stream": "true"}, headers={"Last-Event-ID": f"{sid}:-1"}))
               for _ in range(reps * 3)]
    return {"events": made["events"], "first_byte_ms": median([r["first_byte"] for r in replays]) * 1000,
            "last_byte_ms": median([r["total"] for r in replays]) * 1000}


def replay(server: Server, sid: str, reps: int) -> dict:
    """A whole finished session streamed again from index 0: first and last byte."""
    runs = [asyncio.run(stream_once(server, None, method="GET", path=f"/v1/chat/completions/{sid}",
                                    params={"stream": "true"}, headers={"Last-Event-ID": f"{sid}:-1"}))
            for _ in range(reps)]
    return {"events": runs[0]["events"], "first_byte_ms": median([r["first_byte"] for r in runs]) * 1000,
            "last_byte_ms": median([r["total"] for r in runs]) * 1000}


def p5_memory(server: Server, sessions: int) -> dict:
    before = server.proc_status()

    async def run_all() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            sem = asyncio.Semaphore(4)

            async def one(i: int) -> None:
                async with sem:
                    response = await client.post(server.base_url + "/v1/chat/completions",
                                                 json={**chat_body(4, stream=False, seed=i), "model": server.model_name})
                    response.raise_for_status()

            await asyncio.gather(*(one(i) for i in range(sessions)))

    asyncio.run(run_all())
    after = server.proc_status()
    return {"sessions": sessions, "rss_before_mb": before["rss_mb"], "rss_after_mb": after["rss_mb"],
            "threads_before": before["threads"], "threads_after": after["threads"]}


# ----------------------------------------------------------------------------- report

def build_model() -> str:
    from tiny_model import build

    return str(build(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny"))


def transformers_serve_available() -> bool:
    try:
        import transformers.cli.serving  # noqa: F401
        return True
    except ImportError:
        return False


SECTIONS = ("p1", "p2", "p3", "p4", "p5", "p7")


def raw_reference(model: str, args) -> dict:
    return json.loads(subprocess.run([sys.executable, str(BENCH / "raw.py"), model, str(args.reps), str(args.tokens)],
                                     check=True, capture_output=True, text=True, cwd=BENCH).stdout.splitlines()[-1])


def run(args) -> dict:
    """The sections in `args.only`, each on the servers it needs."""
    only, model = args.only, os.environ.get("MODEL_REPO_ID") or build_model()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "model": model, "reps": args.reps,
              "sections": [name for name in SECTIONS if name in only]}
    if only & {"p1", "p2"}:
        result["raw"] = raw_reference(model, args)
    if only & {"p1", "p2", "p3", "p4", "p5"}:
        with Server.ours(model) as ours:
            result["ours"] = measure(ours, args, only & {"p1", "p2", "p3", "p4", "p5"})
    if "p1" in only:
        with Server.ours(model, PERSIST_SESSIONS="1", SESSIONS_DB_PATH=tempfile.mktemp(suffix=".db")) as sqlite:
            result["ours_sqlite"] = {"p1": p1_throughput(sqlite, args.reps, args.tokens)}
    if only & {"p3", "p7"}:
        with Server.ours(model, MAX_BATCH_SIZE=str(WIDE_BATCH)) as wide:
            result["ours_batch16"] = measure(wide, args, only & {"p3", "p7"}, p3_counts=(1, WIDE_BATCH))
    if only & {"p1", "p2", "p3"} and not args.skip_transformers_serve and transformers_serve_available():
        with Server.transformers_serve(model) as peer:
            result["transformers_serve"] = measure(peer, args, only & {"p1", "p2", "p3"})
    return result


def measure(server: Server, args, names: set[str], p3_counts: tuple[int, ...] | None = None) -> dict:
    """The named sections on one server, in order; P3 is the full set unless `p3_counts` narrows it."""
    def p3() -> dict:
        if p3_counts:
            return p3_streams(server, args.reps, args.stream_tokens, p3_counts)
        return p3_concurrency(server, args.reps, args.stream_tokens)

    measures = {"p1": lambda: p1_throughput(server, args.reps, args.tokens), "p2": lambda: p2_ttft(server, args.reps),
                "p3": p3, "p4": lambda: p4_resume(server, args.reps, args.replay_events),
                "p5": lambda: p5_memory(server, args.sessions),
                "p7": lambda: p7_join(server, args.reps, args.join_tokens, args.join_prompt)}
    out = {name: measures[name]() for name in SECTIONS if name in names}
    if "p7" in names:
        out["p7_video"] = p7_video_join(server, args.reps, args.join_tokens)
    return out


def run_redis(args) -> dict:
    """SESSION_STORE=redis (two replicas, one redis-server) against raw generate and memory:
    P1 one stream, a finished session replayed on another replica vs on its owner, 8
    concurrent streams."""
    from helpers import RedisServer

    model = os.environ.get("MODEL_REPO_ID") or build_model()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "model": model, "reps": args.reps,
              "raw": raw_reference(model, args)}
    with Server.ours(model) as memory:
        result["memory"] = {"p1": p1_throughput(memory, args.reps, args.tokens),
                            "c8": asyncio.run(concurrent(memory, 8, args.stream_tokens))}
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
    try:
        env = {"SESSION_STORE": "redis", "REDIS_URL": redis_server.url}
        with Server.ours(model, **env) as a, Server.ours(model, **env) as b:
            sid = f"bench-replay-{time.time_ns()}"
            asyncio.run(stream_once(a, chat_body(args.replay_events, session_id=sid)))
            result["redis"] = {"p1": p1_throughput(a, args.reps, args.tokens),
                               "replay_owner": replay(a, sid, args.reps * 3),
                               "replay_other": replay(b, sid, args.reps * 3),
                               "c8": asyncio.run(concurrent(a, 8, args.stream_tokens))}
    finally:
        redis_server.stop()
    return result


def redis_table(r: dict) -> str:
    raw, mem, red = r["raw"]["tokens_per_s"], r["memory"], r["redis"]
    own, other = red["replay_owner"], red["replay_other"]
    rows = [("P1 one stream, tok/s: redis / raw generate", f"{red['p1']['tokens_per_s']:.1f} / {raw:.1f}",
             red["p1"]["tokens_per_s"] / raw),
            ("P1 one stream, tok/s: redis / memory", f"{red['p1']['tokens_per_s']:.1f} / {mem['p1']['tokens_per_s']:.1f}",
             red["p1"]["tokens_per_s"] / mem["p1"]["tokens_per_s"]),
            (f"replay of {own['events']} events, first byte ms: other replica / owner",
             f"{other['first_byte_ms']:.1f} / {own['first_byte_ms']:.1f}", other["first_byte_ms"] / own["first_byte_ms"]),
            (f"replay of {own['events']} events, last byte ms: other replica / owner",
             f"{other['last_byte_ms']:.1f} / {own['last_byte_ms']:.1f}", other["last_byte_ms"] / own["last_byte_ms"]),
            ("8 streams, aggregate tok/s: redis / memory",
             f"{red['c8']['aggregate_tokens_per_s']:.1f} / {mem['c8']['aggregate_tokens_per_s']:.1f}",
             red["c8"]["aggregate_tokens_per_s"] / mem["c8"]["aggregate_tokens_per_s"]),
            ("8 streams, TTFT p50 ms: redis / memory", f"{red['c8']['ttft_p50_ms']:.1f} / {mem['c8']['ttft_p50_ms']:.1f}",
             red["c8"]["ttft_p50_ms"] / mem["c8"]["ttft_p50_ms"])]
    lines = [f"SESSION_STORE=redis, {r['date']}, {r['machine']}, reps {r['reps']}", "",
             "| measure | values | ratio |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name} | {values} | {ratio:.2f} |" for name, values, ratio in rows]) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def table(r: dict) -> str:
    ours, wide = r.get("ours", {}), r.get("ours_batch16", {})
    lines = [f"Run {r['date']} on {r['machine']}; model {Path(r['model']).name}; median of {r['reps']}.", "",
             "| Measure | This server | Reference | Ratio / overhead | Target |", "| --- | --- | --- | --- | --- |"]
    lines += reference_rows(r) if "raw" in r else []
    lines += p3_rows(ours["p3"]) if "p3" in ours else []
    lines += p3_wide_rows(wide["p3"]) if "p3" in wide else []
    lines += p4_p5_rows(ours)
    lines += p7_rows(wide["p7"]) if "p7" in wide else []
    lines += p7_rows(wide["p7_video"], "video ") if "p7_video" in wide else []
    if r.get("transformers_serve"):
        lines += peer_rows(ours, r["transformers_serve"])
    return "\n".join(lines) + "\n"


def reference_rows(r: dict) -> list[str]:
    raw, ours = r["raw"], r["ours"]
    rows = []
    if "p1" in ours:
        rows += [("P1 one stream, tok/s (in memory)", ours["p1"]["tokens_per_s"], raw["tokens_per_s"], "≥ 0.95x raw"),
                 ("P1 one stream, tok/s (SQLite)", r["ours_sqlite"]["p1"]["tokens_per_s"], raw["tokens_per_s"],
                  "≥ 0.92x raw")]
    if "p2" in ours:
        rows += [("P2 TTFT text, ms (ref: raw prefill)", ours["p2"]["text_ms"], raw["prefill_text_ms"], "≤ +10 ms"),
                 ("P2 TTFT 640x480 image, ms (ref: raw prefill)", ours["p2"]["image_ms"], raw["prefill_image_ms"],
                  "≤ +10 ms")]
    lines = []
    for name, value, ref, target in rows:
        relation = f"{value - ref:+.1f} ms" if "ms" in name else f"{value / ref:.2f}x"
        lines.append(f"| {name} | {value:.1f} | {ref:.1f} | {relation} | {target} |")
    return lines


def p3_rows(p3: dict, label_suffix: str = "", targets: dict | None = None) -> list[str]:
    """Aggregate tok/s against one stream on the same server, and TTFT; `targets` by row."""
    targets = targets or {"c8": ("≥ 6x 1 stream", "record"), "random_arrivals_8": ("record", "p95 ≤ 25 ms")}
    single, lines = p3["c1"]["aggregate_tokens_per_s"], []
    for key, p in p3.items():
        streams = "1 stream" if key == "c1" else f"{p['streams']:.0f} streams"
        label = streams + (", random arrivals over 2 s" if key.startswith("random") else "") + label_suffix
        rate, ttft = targets.get(key, ("record", "record"))
        lines.append(f"| P3 {label}: aggregate tok/s | {p['aggregate_tokens_per_s']:.0f} | {single:.0f} (1 stream) | "
                     f"{p['aggregate_tokens_per_s'] / single:.2f}x | {rate} |")
        lines.append(f"| P3 {label}: TTFT p50 / p95, ms | {p['ttft_p50_ms']:.1f} / {p['ttft_p95_ms']:.1f} | | | {ttft} |")
    return lines


def p3_wide_rows(p3: dict) -> list[str]:
    return p3_rows(p3, f" (MAX_BATCH_SIZE={WIDE_BATCH})", {f"c{WIDE_BATCH}": ("≥ 9x 1 stream", "record")})


def p4_p5_rows(ours: dict) -> list[str]:
    lines = []
    if "p4" in ours:
        p4 = ours["p4"]
        lines.append(f"| P4 replay of a finished {p4['events']}-event session: first / last byte, ms | "
                     f"{p4['first_byte_ms']:.1f} / {p4['last_byte_ms']:.1f} | | | record |")
    if "p5" in ours:
        p5 = ours["p5"]
        lines += [f"| P5 RSS before / after {p5['sessions']} sessions, MB | {p5['rss_before_mb']:.0f} / "
                  f"{p5['rss_after_mb']:.0f} | | {p5['rss_after_mb'] / p5['rss_before_mb']:.2f}x | record |",
                  f"| P5 threads before / after | {p5['threads_before']} / {p5['threads_after']} | | | record |"]
    return lines


def p7_rows(p7: dict, kind: str = "") -> list[str]:
    joins = f"P7 a {p7['prompt_tokens']:.0f}-token {kind}prompt joins {p7['streams']} streams"
    return [f"| {joins}: event gap p99 during / before the join, ms | {p7['gap_p99_during_ms']:.1f} | "
            f"{p7['gap_p99_before_ms']:.1f} (before) | {p7['gap_ratio']:.2f}x | ≤ 2x |",
            f"| {joins}: longest event gap during the join, ms | {p7['gap_max_during_ms']:.1f} | | | record |",
            f"| {joins}: its TTFT, ms | {p7['joiner_ttft_ms']:.1f} | | | record |"] + ([
            f"| P7 server time per output token, p99 / longest (bucket bounds), ms | "
            f"{p7['server_token_latency_p99_ms']:.0f} / {p7['server_token_latency_max_ms']:.0f} | | | record |"]
            if "server_token_latency_p99_ms" in p7 else [])


def peer_rows(ours: dict, peer: dict) -> list[str]:
    lines = ["", "Side by side with `transformers serve` (same checkpoint, same client):", "",
             "| Measure | This server | transformers serve | Ratio |", "| --- | --- | --- | --- |"]
    if "p1" in peer:
        lines.append(f"| P1 one stream, tok/s | {ours['p1']['tokens_per_s']:.1f} | {peer['p1']['tokens_per_s']:.1f} | "
                     f"{ours['p1']['tokens_per_s'] / peer['p1']['tokens_per_s']:.2f}x |")
    for key, label in (("text_ms", "text"), ("image_ms", "image")) if "p2" in peer else ():
        lines.append(f"| P2 TTFT {label}, ms | {ours['p2'][key]:.1f} | {peer['p2'][key]:.1f} | "
                     f"{ours['p2'][key] / peer['p2'][key]:.2f}x |")
    for key in ("c1", "c4", "c8", "random_arrivals_8") if "p3" in peer else ():
        a, b = ours["p3"][key], peer["p3"][key]
        lines.append(f"| P3 {key}: aggregate tok/s | {a['aggregate_tokens_per_s']:.0f} | "
                     f"{b['aggregate_tokens_per_s']:.0f} | "
                     f"{a['aggregate_tokens_per_s'] / b['aggregate_tokens_per_s']:.2f}x |")
        lines.append(f"| P3 {key}: TTFT p95, ms | {a['ttft_p95_ms']:.1f} | {b['ttft_p95_ms']:.1f} | "
                     f"{a['ttft_p95_ms'] / b['ttft_p95_ms']:.2f}x |")
    return lines


def parse_sections(text: str) -> set[str]:
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    if not names or names - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SECTIONS)}")
    return names


def main() -> None:
    if "--gpu-config" in sys.argv:  # the engine at full size on a GPU: bench/gpu.py takes the other options
        sys.argv.remove("--gpu-config")
        os.execv(sys.executable, [sys.executable, str(BENCH / "gpu.py"), *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512, help="P1 stream length")
    parser.add_argument("--stream-tokens", type=int, default=256, help="P3 stream length")
    parser.add_argument("--replay-events", type=int, default=2000, help="P4 session length")
    parser.add_argument("--sessions", type=int, default=1000, help="P5 session count")
    parser.add_argument("--join-tokens", type=int, default=256, help="P7 running streams' length")
    parser.add_argument("--join-prompt", type=int, default=2000, help="P7 long prompt, tokens (about)")
    parser.add_argument("--only", type=parse_sections, default=set(SECTIONS), metavar="p1,p3,p7",
                        help="run only these sections (P3 includes its 16-stream server)")
    parser.add_argument("--skip-transformers-serve", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: few reps, short streams")
    parser.add_argument("--redis", action="store_true", help="SESSION_STORE=redis vs memory and raw generate only")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--gpu-config", action="store_true",
                        help="instead: bench/gpu.py, the engine at Qwen3-VL-2B's size with random weights")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tokens, args.stream_tokens, args.replay_events, args.sessions = 1, 32, 16, 50, 20
        args.join_tokens = 128
        args.skip_transformers_serve = True
    if args.redis:
        result = run_redis(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest-redis.json").write_text(json.dumps(result, indent=2))
        (args.out / "latest-redis.md").write_text(redis_table(result))
        print(redis_table(result))
        return
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2))
    (args.out / "latest.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
