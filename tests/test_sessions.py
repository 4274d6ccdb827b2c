"""Streams that survive the network: resume by Last-Event-ID, readers, cancel, auto-cancel."""

import json
import threading
import time

import httpx
import pytest

from helpers import (TELL_ME, chunk_payloads, event_index, final_choice, get_completion, image_message, joined_text,
                     long_request, metric, parse_sse, png_data_uri, post, session_body, stream_events, wait_generating,
                     wait_status, wait_until)


def short_request(session_id: str, **extra) -> dict:
    return {"messages": TELL_ME, "max_tokens": 60, "ignore_eos": True, "seed": 3, "temperature": 1.0, "stream": True,
            "session_id": session_id, **extra}


def assert_contiguous(events: list[dict], session_id: str, start: int = 0) -> None:
    assert [e["id"] for e in events] == [f"{session_id}:{i}" for i in range(start, start + len(events))]


def test_resume_after_disconnect_replays_exactly_the_missing_events(base_url):
    _, _, reference = stream_events(base_url, short_request("resume-ref"))
    _, _, first = stream_events(base_url, short_request("resume-a"), limit=4)
    last_seen = first[-1]["id"]
    wait_status(base_url, "resume-a", {"completed"})
    _, status, rest = stream_events(base_url, short_request("resume-a"), headers={"Last-Event-ID": last_seen})
    assert status == 200
    joined = first + rest
    assert_contiguous(joined, "resume-a")
    assert joined[-1]["data"] == "[DONE]"
    # event boundaries depend on timing (deltas that pile up are merged): compare what they say
    for field in ("reasoning_content", "content"):
        assert joined_text(joined, field) == joined_text(reference, field)
    assert chunk_payloads(joined)[-2:] == chunk_payloads(reference)[-2:]


def test_reconnect_while_live_twice_keeps_the_seam_exact(base_url):
    body = long_request(session_id="seam-1", max_tokens=600)
    _, _, a = stream_events(base_url, body, limit=3)
    _, _, b = stream_events(base_url, body, headers={"Last-Event-ID": a[-1]["id"]}, limit=5)
    _, _, c = stream_events(base_url, body, params={"last_event_id": b[-1]["id"]})
    joined = a + b + c
    assert_contiguous(joined, "seam-1")
    assert joined[-1]["data"] == "[DONE]"
    full = stream_events(base_url, body, headers={"Last-Event-ID": "seam-1:-1"})[2]
    assert [e["data"] for e in full] == [e["data"] for e in joined]


def test_resume_never_starts_a_second_generation(base_url):
    _, _, events = stream_events(base_url, short_request("no-second-gen"))
    before = get_completion(base_url, "no-second-gen")
    _, _, again = stream_events(base_url, short_request("no-second-gen"), headers={"Last-Event-ID": "no-second-gen:0"})
    assert [e["data"] for e in again] == [e["data"] for e in events[1:]]
    assert get_completion(base_url, "no-second-gen") == before


def test_two_readers_at_once_get_identical_streams(base_url):
    body = long_request(session_id="two-readers", max_tokens=400)
    results = {}

    def second_reader():
        wait_until(lambda: session_body(base_url, "two-readers"), message="two-readers created")
        results["b"] = stream_events(base_url, body, method="GET", path="/v1/chat/completions/two-readers",
                                     params={"stream": "true"})[2]

    thread = threading.Thread(target=second_reader)
    thread.start()
    results["a"] = stream_events(base_url, body)[2]
    thread.join()
    assert results["a"] == results["b"]
    assert_contiguous(results["a"], "two-readers")


def test_resume_after_completion_and_json_after_disconnect(base_url):
    _, _, first = stream_events(base_url, short_request("after-done"), limit=2)
    body = wait_status(base_url, "after-done", {"completed"})
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 60
    assert body["choices"][0]["finish_reason"] == "length"
    _, _, rest = stream_events(base_url, short_request("after-done"), headers={"Last-Event-ID": first[-1]["id"]})
    assert_contiguous(first + rest, "after-done")
    streamed = "".join(json.loads(e["data"])["choices"][0]["delta"].get("reasoning_content") or ""
                       for e in (first + rest)[:-1] if json.loads(e["data"])["choices"])
    assert streamed == body["choices"][0]["message"]["reasoning_content"]


def test_eventsource_style_get_resumes_with_header_or_query(base_url):
    _, _, events = stream_events(base_url, short_request("es-get"))
    path = "/v1/chat/completions/es-get"
    by_header = stream_events(base_url, method="GET", path=path, params={"stream": "true"},
                              headers={"Last-Event-ID": "es-get:5"})[2]
    by_query = stream_events(base_url, method="GET", path=path, params={"stream": "true", "last_event_id": "es-get:5"})
    assert by_header == events[6:] == by_query[2]
    header_wins = stream_events(base_url, method="GET", path=path, headers={"Last-Event-ID": "es-get:7"},
                                params={"stream": "true", "last_event_id": "es-get:2"})[2]
    assert header_wins == events[8:]


def test_cancel_mid_stream_stops_generation_and_ends_both_readers(base_url):
    body = long_request(session_id="cancel-me")
    results = {}

    def reader(name, **kw):
        results[name] = stream_events(base_url, body, **kw)[2]

    threads = [threading.Thread(target=reader, args=("a",)),
               threading.Thread(target=reader, args=("b",),
                                kwargs={"method": "GET", "path": "/v1/chat/completions/cancel-me",
                                        "params": {"stream": "true"}})]
    wait_until(lambda: metric(base_url, "qwen_listeners") == 0, message="earlier readers detached")
    threads[0].start()
    wait_generating(base_url, "cancel-me")
    threads[1].start()
    wait_until(lambda: metric(base_url, "qwen_listeners") == 2, message="both readers attached")
    response = httpx.post(f"{base_url}/v1/cancel/cancel-me", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    for thread in threads:
        thread.join(timeout=30)
    for events in results.values():
        assert events[-1]["data"] == "[DONE]"
        final = json.loads(events[-2]["data"])
        assert (final["choices"][0]["finish_reason"], final["choices"][0]["end_reason"]) == ("stop", "cancelled")
    tokens = get_completion(base_url, "cancel-me")["usage"]["completion_tokens"]
    assert 0 < tokens < 3000
    time.sleep(0.3)  # the pause is the check: nothing may be generated after the cancel answered
    after = get_completion(base_url, "cancel-me")
    assert after["usage"]["completion_tokens"] == tokens and after["status"] == "cancelled"
    again = httpx.post(f"{base_url}/v1/cancel/cancel-me")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_of_finished_session_keeps_its_status(base_url):
    stream_events(base_url, short_request("finished-then-cancel"))
    response = httpx.post(f"{base_url}/v1/cancel/finished-then-cancel")
    assert response.status_code == 200 and response.json()["status"] == "completed"


def test_cancel_unknown_session_is_404(base_url):
    assert httpx.post(f"{base_url}/v1/cancel/never-was").status_code == 404


def test_reusing_a_running_session_id_without_last_event_id_is_409(base_url):
    body = long_request(session_id="conflict-1", max_tokens=800)
    stream_events(base_url, body, limit=2)
    response = httpx.post(base_url + "/v1/chat/completions", json=body)
    assert response.status_code == 409 and response.json()["error"]["code"] == "session_exists"
    httpx.post(f"{base_url}/v1/cancel/conflict-1")


@pytest.mark.parametrize("header,status", [
    ("garbage", 400), ("no-index:", 400), ("x:1:2", 400), ("unknown-session:3", 404),
])
def test_bad_last_event_ids(base_url, header, status):
    body = {k: v for k, v in short_request("unused").items() if k != "session_id"}
    response = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"Last-Event-ID": header})
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_last_event_id_of_another_session_than_the_body_is_400(base_url):
    stream_events(base_url, short_request("mismatch-a"))
    response = httpx.post(base_url + "/v1/chat/completions", json=short_request("mismatch-b"),
                          headers={"Last-Event-ID": "mismatch-a:1"})
    assert response.status_code == 400


def test_index_beyond_the_log_is_400_and_unknown_get_is_404(base_url):
    stream_events(base_url, short_request("beyond"))
    response = httpx.get(base_url + "/v1/chat/completions/beyond", params={"stream": "true"},
                         headers={"Last-Event-ID": "beyond:9999"})
    assert response.status_code == 400
    assert httpx.get(base_url + "/v1/chat/completions/never-was").status_code == 404


def test_stale_index_older_than_ring_buffer_is_410(make_server):
    srv = make_server(session_buffer_events=8)
    _, _, events = stream_events(srv.base_url, short_request("small-buffer"))
    assert len(events) > 8
    response = httpx.post(srv.base_url + "/v1/chat/completions", json=short_request("small-buffer"),
                          headers={"Last-Event-ID": "small-buffer:0"})
    assert response.status_code == 410 and response.json()["error"]["code"] == "events_expired"
    recent = stream_events(srv.base_url, short_request("small-buffer"), headers={"Last-Event-ID": events[-4]["id"]})[2]
    assert recent == events[-3:]


def test_a_finished_session_keeps_no_prompt_tensors(make_server):
    """#14: every finished session kept its prompt's tensors (an image's pixel values) until it
    expired, so each new request faulted in fresh memory for its own and image TTFT rose by
    5-8 ms. Verified: once an image request ends its job holds no inputs, and the session
    still answers with its result and usage."""
    srv = make_server()
    body = {"messages": image_message(png_data_uri()), "max_tokens": 3, "ignore_eos": True, "session_id": "pixels"}
    answer = post(srv.base_url, body)
    assert answer.status_code == 200, answer.text
    job = srv.state.sessions.sessions["pixels"].job
    assert job.inputs is None and job.prompt_tokens > 0
    again = get_completion(srv.base_url, "pixels")
    assert again["usage"] == answer.json()["usage"] and again["usage"]["completion_tokens"] == 3


def test_a_running_generation_keeps_no_prompt_tensors(make_server):
    """#14: a running request still held its prompt's tensors (an image's pixel values)
    until it ended, though only its prefill reads them. Verified: while an image request
    is still decoding, its job holds no inputs, and it ends whole."""
    srv = make_server()
    body = {"messages": image_message(png_data_uri()), "max_tokens": 3000, "ignore_eos": True, "stream": True,
            "session_id": "decoding-pixels"}
    done = threading.Thread(target=stream_events, args=(srv.base_url, body), daemon=True)
    done.start()
    wait_generating(srv.base_url, "decoding-pixels")
    job = srv.state.sessions.sessions["decoding-pixels"].job
    assert job.inputs is None and job.running == 1  # still decoding, without its pixel values
    assert httpx.post(f"{srv.base_url}/v1/cancel/decoding-pixels").status_code == 200
    done.join(timeout=60)
    assert get_completion(srv.base_url, "decoding-pixels")["choices"][0]["end_reason"] == "cancelled"


def test_a_quick_first_token_leaves_with_the_stream_head(make_server, monkeypatch):
    """#14 (D74): a stream's head and role chunk went out while its prompt was prefilled,
    and their sends slowed the prefill by ~3 ms of GIL hand-offs. Verified, with the hold
    made long enough that only the first token can end it: when the head reaches the
    client the session's log already holds an event after the role chunk, and the stream
    is whole."""
    import main

    monkeypatch.setattr(main, "STREAM_HEAD_HOLD_SECONDS", 60.0)
    srv = make_server()
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=short_request("held-head"), timeout=60) as r:
        assert r.status_code == 200 and srv.state.sessions.sessions["held-head"].log.visible >= 1
        events = parse_sse(r.iter_lines())
    assert_contiguous(events, "held-head")
    assert final_choice(events)["finish_reason"] == "length" and events[-1]["data"] == "[DONE]"


def test_a_stream_head_is_held_no_longer_than_the_bound_and_is_not_auto_cancelled(make_server, monkeypatch):
    """D74: a head held for the first token must still come when that token is slow (a queue,
    a long prefill), and the held stream counts as listened to. Verified with the prefill
    blocked until the head has arrived and an auto-cancel delay far below the hold: the head
    comes with nothing past the role chunk in the log, then the stream runs to its end."""
    import main

    release = threading.Event()

    class SlowPrefill(main.Prefill):
        def __init__(self, *args):
            release.wait(60)
            super().__init__(*args)

    monkeypatch.setattr(main, "STREAM_HEAD_HOLD_SECONDS", 0.5)
    monkeypatch.setattr(main, "Prefill", SlowPrefill)
    srv = make_server(cancel_after_disconnect_seconds=0.05)
    try:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=short_request("slow-first-token"),
                          timeout=60) as r:
            assert r.headers["x-session-id"] == "slow-first-token"
            assert srv.state.sessions.sessions["slow-first-token"].log.visible == 0
            release.set()
            events = parse_sse(r.iter_lines())
    finally:
        release.set()
    assert final_choice(events)["finish_reason"] == "length" and events[-1]["data"] == "[DONE]"


@pytest.fixture(scope="module")
def auto_cancel_server(make_module_server):
    return make_module_server(cancel_after_disconnect_seconds=1.0)


def test_auto_cancel_fires_once_nobody_listens(auto_cancel_server):
    url = auto_cancel_server.base_url
    stream_events(url, long_request(session_id="abandoned", max_tokens=3000), limit=3)
    body = wait_status(url, "abandoned", {"cancelled", "completed"}, timeout=10)
    assert body["status"] == "cancelled" and body["choices"][0]["end_reason"] == "cancelled"
    assert body["usage"]["completion_tokens"] < 3000


def test_auto_cancel_does_not_fire_while_a_reader_listens(auto_cancel_server):
    url = auto_cancel_server.base_url
    started = time.monotonic()
    _, _, events = stream_events(url, long_request(session_id="watched", max_tokens=1500))
    assert time.monotonic() - started > 1.5, "generation must outlive the auto-cancel delay for this test"
    assert json.loads(events[-2]["data"])["choices"][0]["finish_reason"] == "length"
    assert get_completion(url, "watched")["status"] == "completed"


def test_auto_cancel_timer_stops_when_a_reader_comes_back(auto_cancel_server):
    url = auto_cancel_server.base_url
    body = long_request(session_id="came-back", max_tokens=1500)
    _, _, first = stream_events(url, body, limit=2)
    time.sleep(0.5)  # the client stays away, for less than the 1 s auto-cancel delay: that is the behaviour tested
    _, _, rest = stream_events(url, body, headers={"Last-Event-ID": first[-1]["id"]})
    assert json.loads(rest[-2]["data"])["choices"][0]["finish_reason"] == "length"
    assert event_index(rest[0]) == event_index(first[-1]) + 1


def test_listener_counts_return_to_zero_after_disconnects(auto_cancel_server):
    url = auto_cancel_server.base_url
    stream_events(url, short_request("count-me", max_tokens=400), limit=2)
    stream_events(url, short_request("count-me", max_tokens=400), headers={"Last-Event-ID": "count-me:0"}, limit=2)
    assert wait_until(lambda: metric(url, "qwen_listeners") == 0, timeout=5, message="no listener left")
