"""Bounds on one generation: GENERATION_TIMEOUT_SECONDS ends a runaway stream with
finish_reason "length" with end_reason "timeout"; CONTEXT_OVERFLOW=truncate drops the oldest turns (and says how
many), and a single turn too long for the context is still a 400."""

import json

import httpx

from helpers import assert_error, final_choice, long_request, post, stream_events


def test_generation_timeout_ends_a_runaway_stream_with_a_clear_finish(make_server):
    srv = make_server(generation_timeout_seconds=0.3)
    _, _, events = stream_events(srv.base_url, long_request(max_tokens=3000, session_id="runaway"))
    final = final_choice(events)
    assert (final["finish_reason"], final["end_reason"]) == ("length", "timeout") and events[-1]["data"] == "[DONE]"
    body = httpx.get(srv.base_url + "/v1/chat/completions/runaway").json()
    assert 0 < body["usage"]["completion_tokens"] < 3000


def test_context_overflow_truncate_drops_oldest_turns_and_says_so(make_server):
    long_turn = "hello there " * 1000
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_turn},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": long_turn},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "And now?"}]
    srv = make_server(context_overflow="truncate")
    body = post(srv.base_url, {"messages": messages, "max_tokens": 2}).json()
    assert body["truncated_messages"] >= 1 and body["usage"]["prompt_tokens"] < 4096
    _, _, events = stream_events(srv.base_url, {"messages": messages, "max_tokens": 2, "stream": True})
    assert json.loads(events[0]["data"])["truncated_messages"] == body["truncated_messages"]
    alone = post(srv.base_url, {"messages": [{"role": "user", "content": long_turn * 3}]})
    assert_error(alone, 400, "context_length_exceeded")
