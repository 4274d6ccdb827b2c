"""Several replicas sharing sessions through Redis (issue #11, D60-D69), end to end: two
real `python main.py` processes on 127.0.0.1 with SESSION_STORE=redis and one real
redis-server (AOF with fsync always, so a restart keeps what it acknowledged).

Replicas A and B live for the module; tests that kill a replica start their own."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from helpers import (RedisServer, ServerProcess, assert_error, event_index, get_completion, long_request,
                     stream_events, wait_generating, wait_status, wait_until)

LEASE = "1.5"  # seconds: a killed replica's sessions close soon after
CANCEL_AFTER = 2.0  # seconds without a listener on any replica before auto-cancel


def replica(tiny_model_dir, tmp_path_factory, redis_url: str, name: str) -> ServerProcess:
    log = tmp_path_factory.mktemp(f"replica-{name}") / "server.log"
    return ServerProcess(tiny_model_dir, log, SESSION_STORE="redis", REDIS_URL=redis_url, REDIS_LEASE_SECONDS=LEASE,
                         CANCEL_AFTER_DISCONNECT_SECONDS=str(CANCEL_AFTER), REPLICA_ID=f"test-{name}-{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def redis_db(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory, redis_db):
    a = replica(tiny_model_dir, tmp_path_factory, redis_db.url, "a").start(wait=False)
    b = replica(tiny_model_dir, tmp_path_factory, redis_db.url, "b").start()
    from helpers import wait_ready

    wait_ready(a.base_url)
    yield a, b
    for server in (a, b):
        server.stop()


def resume(base_url: str, session_id: str, after: int, limit: int | None = None):
    return stream_events(base_url, {}, headers={"Last-Event-ID": f"{session_id}:{after}"}, limit=limit)


def indexes(events: list[dict]) -> list[int]:
    return [event_index(e) for e in events]


def test_a_stream_dropped_on_one_replica_resumes_on_another_with_exactly_the_rest(replicas):
    """Read k events on A, drop, resume on B after the last one: the remainder, in order,
    no gap, no duplicate, ending in [DONE]; the same events as a whole replay on A."""
    a, b = replicas
    sid = "redis-resume"
    _, status, first = stream_events(a.base_url, long_request(session_id=sid, max_tokens=120), limit=15)
    assert status == 200
    _, status, rest = resume(b.base_url, sid, event_index(first[-1]))
    assert status == 200
    joined = first + rest
    assert indexes(joined) == list(range(len(joined))) and joined[-1]["data"] == "[DONE]"
    _, _, whole = resume(a.base_url, sid, -1)
    assert [e["data"] for e in whole] == [e["data"] for e in joined]


def test_get_result_through_another_replica(replicas):
    """A finished session's GET body on B equals the one on its owner A."""
    a, b = replicas
    sid = "redis-get"
    stream_events(a.base_url, long_request(session_id=sid, max_tokens=30))
    on_a, on_b = get_completion(a.base_url, sid), get_completion(b.base_url, sid)
    assert on_b["status"] == "completed" and on_b["choices"] == on_a["choices"] and on_b["usage"] == on_a["usage"]
    assert httpx.get(f"{b.base_url}/v1/chat/completions/nope", timeout=10).status_code == 404


def test_responses_background_stream_resumes_on_another_replica_with_starting_after(replicas, tiny_model_dir):
    """The openai SDK creates a background response on A and streams it from B with
    starting_after: sequence numbers starting_after+1.., and the same text as on A."""
    a, b = replicas
    on_a = openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0)
    on_b = openai.OpenAI(base_url=b.base_url + "/v1", api_key="unused", max_retries=0)
    created = on_a.responses.create(model="m", input="Tell me something.", background=True, max_output_tokens=60,
                                    extra_body={"seed": 3})
    later = list(on_b.responses.retrieve(created.id, stream=True, starting_after=3))
    assert [e.sequence_number for e in later] == list(range(4, 4 + len(later)))
    assert later[-1].type in ("response.completed", "response.incomplete")
    whole = list(on_a.responses.retrieve(created.id, stream=True))
    assert [e.model_dump() for e in whole[4:]] == [e.model_dump() for e in later]
    assert on_b.responses.retrieve(created.id).output_text == on_a.responses.retrieve(created.id).output_text


def test_previous_response_id_made_on_another_replica(replicas):
    """A response stored by A is a valid previous_response_id on B (its meta is in Redis)."""
    a, b = replicas
    on_a = openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0)
    on_b = openai.OpenAI(base_url=b.base_url + "/v1", api_key="unused", max_retries=0)
    first = on_a.responses.create(model="m", input="hi", max_output_tokens=8)
    second = on_b.responses.create(model="m", input="and again", previous_response_id=first.id, max_output_tokens=8)
    assert second.status in ("completed", "incomplete")
    items = on_b.responses.input_items.list(first.id)
    assert items.data


def test_cancel_through_another_replica_stops_generation_on_the_owner(replicas):
    """POST /v1/cancel on B while a client streams from A: A's generation stops (cancelled,
    far fewer tokens than asked) and A's stream ends with [DONE]."""
    a, b = replicas
    sid = "redis-cancel"
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(
        stream_events(a.base_url, long_request(session_id=sid, max_tokens=3000))[2]))
    reader.start()
    wait_generating(a.base_url, sid)
    response = httpx.post(f"{b.base_url}/v1/cancel/{sid}", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    reader.join(30)
    assert seen[-1]["data"] == "[DONE]" and indexes(seen) == list(range(len(seen)))
    body = get_completion(a.base_url, sid)
    assert body["status"] == "cancelled" and body["usage"]["completion_tokens"] < 3000
    assert get_completion(b.base_url, sid)["status"] == "cancelled"


def read_for(base_url: str, session_id: str, seconds: float) -> list[dict]:
    """Resume from the start and read for `seconds`, then drop the connection."""
    lines, deadline = [], time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", base_url + "/v1/chat/completions", json={},
                           headers={"Last-Event-ID": f"{session_id}:-1"}) as response:
            for line in response.iter_lines():
                lines.append(line)
                if time.monotonic() > deadline:
                    break
    return lines


def test_a_reader_on_another_replica_keeps_the_owner_from_auto_cancelling(replicas):
    """Nobody reads on A, one client reads on B for longer than CANCEL_AFTER: A counts B's
    reader through Redis and keeps generating; once B's reader leaves too, A auto-cancels."""
    a, b = replicas
    sid = "redis-listeners"
    stream_events(a.base_url, long_request(session_id=sid, max_tokens=8000), limit=2)
    read_for(b.base_url, sid, CANCEL_AFTER * 2)
    assert get_completion(a.base_url, sid)["status"] == "in_progress"
    # generous: the idle time is read from replica heartbeats, which a loaded box delays
    wait_status(a.base_url, sid, {"cancelled"}, timeout=CANCEL_AFTER * 12)


def test_delete_through_another_replica(replicas):
    """DELETE /v1/responses/{id} on B forgets a response A made, on both."""
    a, b = replicas
    on_a = openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0)
    created = on_a.responses.create(model="m", input="hi", max_output_tokens=4)
    assert httpx.delete(f"{b.base_url}/v1/responses/{created.id}", timeout=10).json()["deleted"] is True
    assert httpx.get(f"{b.base_url}/v1/responses/{created.id}", timeout=10).status_code == 404


def test_two_replicas_racing_for_one_session_id_give_one_200_and_one_409(replicas):
    a, b = replicas
    statuses: list[int] = []
    start = threading.Barrier(2)

    def claim(base_url: str) -> None:
        start.wait()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "session_id": "redis-race"}
        statuses.append(httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=claim, args=(s.base_url,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 409]


def test_redis_stopped_mid_stream_and_restarted_loses_reorders_and_duplicates_nothing(replicas, redis_db):
    """Redis stops while A generates, with a reader on A and one on B: requests that need
    Redis get 503 store_unavailable, A's reader keeps streaming (local fallback), no
    process crashes; once Redis is back both readers go on with no gap and no duplicate,
    and the stored stream equals what A's reader saw."""
    a, b = replicas
    sid = "redis-outage"
    seen: dict[str, list[dict]] = {}

    def read(name: str, base_url: str) -> None:
        if name == "a":
            seen[name] = stream_events(base_url, long_request(session_id=sid, max_tokens=3000))[2]
        else:
            seen[name] = resume(base_url, sid, -1)[2]

    reader_a = threading.Thread(target=read, args=("a", a.base_url))
    reader_a.start()
    wait_generating(a.base_url, sid)
    reader_b = threading.Thread(target=read, args=("b", b.base_url))
    reader_b.start()
    time.sleep(0.5)  # let B's reader reach the live stream
    redis_db.stop()
    try:
        assert_error(httpx.get(f"{b.base_url}/v1/chat/completions/{sid}", timeout=10), 503, "store_unavailable")
        tokens = get_completion(a.base_url, sid)["usage"]["completion_tokens"]
        wait_until(lambda: get_completion(a.base_url, sid)["usage"]["completion_tokens"] > tokens + 5, timeout=10,
                   message="A generating during the outage")
    finally:
        redis_db.start()
    httpx.post(f"{b.base_url}/v1/cancel/{sid}", timeout=30)
    reader_a.join(60)
    reader_b.join(60)
    assert a.proc.poll() is None and b.proc.poll() is None
    for name in ("a", "b"):
        events = seen[name]
        assert indexes(events) == list(range(len(events))), name
        assert events[-1]["data"] == "[DONE]", name
    stored = resume(b.base_url, sid, -1)[2]
    assert [e["data"] for e in stored] == [e["data"] for e in seen["a"]]
    assert [e["data"] for e in seen["b"]] == [e["data"] for e in seen["a"]]


def test_replica_killed_mid_stream_reads_as_interrupted_elsewhere_with_every_seen_event(
        replicas, tiny_model_dir, tmp_path_factory, redis_db):
    """kill -9 of the owner C while it streams: after its lease B ends the session with
    the interrupted error and [DONE], after every event C's reader saw, unchanged."""
    _, b = replicas
    c = replica(tiny_model_dir, tmp_path_factory, redis_db.url, "c").start()
    sid = "redis-killed"
    _, status, seen = stream_events(c.base_url, long_request(session_id=sid, max_tokens=3000), limit=40)
    assert status == 200
    c.stop(signal.SIGKILL)
    started = time.monotonic()
    _, status, events = resume(b.base_url, sid, -1)
    assert status == 200 and time.monotonic() - started < 15
    assert [e["data"] for e in events[:len(seen)]] == [e["data"] for e in seen]
    assert indexes(events) == list(range(len(events)))
    assert events[-1]["data"] == "[DONE]"
    assert json.loads(events[-2]["data"])["error"]["code"] == "interrupted"
    assert get_completion(b.base_url, sid)["status"] == "interrupted"
