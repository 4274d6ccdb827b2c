"""n > 1: one prefill, n rows in the batch, each choice sampled with its own generator.

Choice i of a request with `seed` draws with seed + i, so it equals a one-choice request
with seed + i; stops, penalties, logit_bias and ignore_eos apply per choice; usage counts
every choice; cancel ends them all. A request takes one admission slot per choice.
"""

import json
import threading
import time

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helpers import InProcessServer, stream_events, wait_ready

TEXT = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, max_batch_size=4) as server:
        wait_ready(server.base_url)
        yield server


def post(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json={"messages": TEXT, **body}, timeout=60)


def complete(base_url: str, **body) -> dict:
    response = post(base_url, body)
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    return response.json()


def choice_outcome(choice: dict) -> tuple:
    return choice["message"]["reasoning_content"], choice["message"]["content"], choice["finish_reason"]


def logprob_tokens(choice: dict) -> list:
    return [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in choice["logprobs"]["content"]]


def logprob_values(choice: dict) -> list[float]:
    entries = choice["logprobs"]["content"]
    return [v for e in entries for v in [e["logprob"]] + [t["logprob"] for t in e["top_logprobs"]]]


def reassembled(events: list[dict]) -> tuple[dict[int, tuple], dict]:
    """Per choice index (reasoning, content, end reason: end_reason, else finish_reason) from the
    chunks; and the usage."""
    parts: dict[int, list] = {}
    usage = None
    for event in events[:-1]:
        chunk = json.loads(event["data"])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            mine = parts.setdefault(choice["index"], ["", "", None])
            mine[0] += choice["delta"].get("reasoning_content") or ""
            mine[1] += choice["delta"].get("content") or ""
            mine[2] = choice.get("end_reason") or choice["finish_reason"] or mine[2]
    assert events[-1]["data"] == "[DONE]"
    return {i: (r or None, c, f) for i, (r, c, f) in parts.items()}, usage


def test_each_choice_equals_a_single_choice_run_with_seed_plus_index(srv):
    request = {"max_tokens": 30, "ignore_eos": True, "seed": 40, "temperature": 1.0}
    body = complete(srv.base_url, n=3, **request)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    singles = [complete(srv.base_url, **{**request, "seed": 40 + i}) for i in range(3)]
    assert [choice_outcome(c) for c in body["choices"]] == [choice_outcome(s["choices"][0]) for s in singles]
    assert body["usage"]["completion_tokens"] == 90
    assert len({choice_outcome(c) for c in body["choices"]}) == 3, "choices must not share a generator"


def test_streamed_choices_reassemble_per_index_with_summed_usage(srv):
    request = {"max_tokens": 25, "ignore_eos": True, "seed": 7, "temperature": 1.0, "n": 3}
    whole = complete(srv.base_url, **request)
    _, status, events = stream_events(srv.base_url, {"messages": TEXT, "stream": True,
                                                     "stream_options": {"include_usage": True}, **request})
    assert status == 200
    for event in events[:-1]:
        ChatCompletionChunk.model_validate_json(event["data"])
    choices, usage = reassembled(events)
    assert choices == {c["index"]: choice_outcome(c) for c in whole["choices"]}
    assert usage == whole["usage"] and usage["completion_tokens"] == 75
    finishes = [json.loads(e["data"])["choices"][0]["index"] for e in events[:-1]
                if json.loads(e["data"])["choices"] and json.loads(e["data"])["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]


def test_stops_penalties_and_bias_apply_per_choice(srv):
    request = {"max_tokens": 40, "seed": 60, "temperature": 1.0, "stop": ["e", "a"], "frequency_penalty": 1.0,
               "logit_bias": {"5": 2.0}, "min_tokens": 3, "logprobs": True, "top_logprobs": 1}
    body = complete(srv.base_url, n=4, **request)
    singles = [complete(srv.base_url, **{**request, "seed": 60 + i})["choices"][0] for i in range(4)]
    assert [choice_outcome(c) for c in body["choices"]] == [choice_outcome(s) for s in singles]
    for batched, single in zip(body["choices"], singles):
        assert logprob_tokens(batched) == logprob_tokens(single)
        # a row decoded in a batch of 4 may differ from one decoded alone in the last bit of a logit
        assert logprob_values(batched) == pytest.approx(logprob_values(single), abs=1e-5)
    assert {c["finish_reason"] for c in body["choices"]} <= {"stop", "length"}


def test_greedy_choices_are_identical(srv):
    body = complete(srv.base_url, n=2, max_tokens=12, temperature=0)
    assert choice_outcome(body["choices"][0]) == choice_outcome(body["choices"][1])


def test_batch_mixing_n_choices_with_other_rows_keeps_every_row_exact(srv):
    """MAX_BATCH_SIZE 4 and 5 rows: the later jobs wait for rows, then join mid-batch."""
    bodies = [{"max_tokens": 60, "ignore_eos": True, "seed": 1, "temperature": 1.0, "n": 2},
              {"max_tokens": 45, "ignore_eos": True, "temperature": 0},
              {"max_tokens": 50, "seed": 3, "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5, "n": 2,
               "logprobs": True}]
    alone = [[choice_outcome(c) for c in complete(srv.base_url, **b)["choices"]] for b in bodies]
    results: dict[int, list] = {}

    def run(i: int) -> None:
        time.sleep(i * 0.02)
        results[i] = [choice_outcome(c) for c in complete(srv.base_url, **bodies[i])["choices"]]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(bodies))] == alone


def test_cancel_stops_every_choice(srv):
    body = {"messages": TEXT, "max_tokens": 3000, "ignore_eos": True, "seed": 2, "temperature": 1.0, "n": 3,
            "stream": True, "session_id": "three-choices"}
    cancelled = []

    def cancel_soon() -> None:
        time.sleep(0.3)
        cancelled.append(httpx.post(srv.base_url + "/v1/cancel/three-choices").json()["status"])

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    events = stream_events(srv.base_url, body)[2]
    canceller.join()
    choices, _ = reassembled(events)
    assert cancelled == ["cancelled"] and [choices[i][2] for i in range(3)] == ["cancelled"] * 3
    result = httpx.get(srv.base_url + "/v1/chat/completions/three-choices").json()
    assert result["status"] == "cancelled" and [c["end_reason"] for c in result["choices"]] == ["cancelled"] * 3
    assert result["usage"]["completion_tokens"] < 3 * 3000


@pytest.mark.parametrize("n", [0, 5, 1000])
def test_n_outside_one_to_max_batch_size_is_400(srv, n):
    response = post(srv.base_url, {"n": n, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_an_n_choice_request_takes_n_admission_slots(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, max_batch_size=2, max_queue=0) as small:
        wait_ready(small.base_url)
        body = {"messages": TEXT, "max_tokens": 3000, "ignore_eos": True, "n": 2, "stream": True,
                "session_id": "both-slots"}
        events = stream_events(small.base_url, body, limit=3)[2]
        assert len(events) == 3
        busy = post(small.base_url, {"max_tokens": 2})
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert httpx.post(small.base_url + "/v1/cancel/both-slots").json()["status"] == "cancelled"
        assert post(small.base_url, {"max_tokens": 2}).status_code == 200
