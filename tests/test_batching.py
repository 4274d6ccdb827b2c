"""Continuous batching: rows decode together yet each gets exactly what it would alone."""

import json
import threading
import time

import httpx
import pytest

import main
from helpers import joined_text, long_request, metric, png_data_uri, stream_events, wait_generating


def request(i: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}: " + "why? " * (i % 4)}],
            "max_tokens": 60 + 10 * i, "stream": True, "stream_options": {"include_usage": True}, **extra}


MIXED = [
    request(0, temperature=0),
    request(1, seed=11, temperature=1.0, top_p=1.0, top_k=0),
    request(2, seed=12, temperature=0.7, top_p=0.9, top_k=20),
    request(3, seed=13, temperature=1.2, frequency_penalty=1.5, presence_penalty=0.5),
    {**request(4, seed=14, temperature=1.0, min_tokens=70, logit_bias={"5": 3.0}),
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": png_data_uri(size=(96, 64))}},
         {"type": "text", "text": "What is in the image?"}]}]},
    request(5, temperature=0, ignore_eos=True, max_tokens=40),
    request(6, seed=15, temperature=1.0, top_p=1.0, top_k=0),  # samples in one group with request 1
    request(7, seed=16, temperature=0.7, top_p=0.9, top_k=20, stop=["e", "a"]),
]


def outcome(events: list[dict]) -> tuple:
    """What a client reads: both texts, the finish reason, the usage."""
    usage = json.loads(events[-2]["data"])["usage"]
    finish = json.loads(events[-3]["data"])["choices"][0]["finish_reason"]
    return joined_text(events, "reasoning_content"), joined_text(events, "content"), finish, usage


def in_threads(calls: list, while_running=None) -> list:
    """Run each call in its own thread (optionally doing something meanwhile); their results in order."""
    results: dict[int, object] = {}

    def one(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    if while_running:
        while_running()
    for thread in threads:
        thread.join(timeout=120)
    return [results[i] for i in range(len(calls))]


def staggered_streams(base_url: str, bodies: list[dict], gap: float) -> list[list[dict]]:
    """Each body streamed to the end, the i-th starting i * gap seconds after the first."""
    def call(i: int):
        # the sleep is the workload: requests arriving while others decode, not coordination
        return lambda: (time.sleep(i * gap), stream_events(base_url, bodies[i])[2])[1]

    return in_threads([call(i) for i in range(len(bodies))])


def run_staggered(base_url: str, bodies: list[dict], gap: float) -> list[tuple]:
    return [outcome(events) for events in staggered_streams(base_url, bodies, gap)]


def batch_sizes(base_url: str) -> tuple[float, float]:
    """(steps decoded, rows decoded) from the batch-size histogram."""
    return metric(base_url, "qwen_decode_batch_size_count"), metric(base_url, "qwen_decode_batch_size_sum")


@pytest.fixture(scope="module")
def batched(make_module_server):
    return make_module_server(max_batch_size=8)


def test_each_request_gets_identical_output_alone_and_batched(batched):
    alone = [outcome(stream_events(batched.base_url, body)[2]) for body in MIXED]
    steps_before, rows_before = batch_sizes(batched.base_url)
    together = run_staggered(batched.base_url, MIXED, gap=0.03)
    steps, rows = batch_sizes(batched.base_url)
    assert (rows - rows_before) / (steps - steps_before) > 1.5, "requests did not share decode steps"
    assert together == alone
    reversed_order = run_staggered(batched.base_url, MIXED[::-1], gap=0.05)
    assert reversed_order == alone[::-1]


def test_greedy_batched_rows_match_raw_generate(batched, tiny_model_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    bodies, expected = [], []
    for i, with_image in enumerate((False, True, False)):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": f"Prompt {i} " * (i + 1)}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image] if with_image else None, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        raw = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        reasoning, _, content = raw.partition("</think>")
        expected.append((reasoning, content))
        image_part = {"type": "image_url", "image_url": {"url": png_data_uri(size=(96, 64), color=(200, 30, 30))}}
        parts = ([image_part] if with_image else []) + [{"type": "text", "text": f"Prompt {i} " * (i + 1)}]
        bodies.append({"messages": [{"role": "user", "content": parts}], "max_tokens": 40, "ignore_eos": True,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    results = run_staggered(batched.base_url, bodies, gap=0.02)
    assert [(r[0], r[1]) for r in results] == expected


def test_stops_and_max_tokens_end_only_their_row(batched):
    base = outcome(stream_events(batched.base_url, request(1, seed=21, temperature=1.0))[2])
    stop = base[0][10:13]
    bodies = [long_request(max_tokens=300, session_id="long-neighbour", stream_options={"include_usage": True}),
              request(1, seed=21, temperature=1.0, stop=[stop]),
              request(1, seed=21, temperature=1.0, max_tokens=7, ignore_eos=True)]
    results = run_staggered(batched.base_url, bodies, gap=0.02)
    assert results[0][2] == "length" and results[0][3]["completion_tokens"] == 300
    assert results[1][2] == "stop" and results[1][0] == base[0][:base[0].find(stop)]
    assert results[2][2] == "length" and results[2][3]["completion_tokens"] == 7


def test_cancelled_row_stops_while_others_continue(batched):
    bodies = [long_request(max_tokens=400, session_id=f"row-{i}") for i in range(3)]
    statuses = []

    def cancel_middle_row() -> None:
        wait_generating(batched.base_url, "row-1")
        statuses.append(httpx.post(batched.base_url + "/v1/cancel/row-1").json()["status"])

    results = in_threads([lambda b=b: stream_events(batched.base_url, b)[2] for b in bodies], cancel_middle_row)
    assert statuses == ["cancelled"]
    finals = [json.loads(results[i][-2]["data"])["choices"][0] for i in range(3)]
    assert [c["finish_reason"] for c in finals] == ["length", "stop", "length"]
    assert [c.get("end_reason") for c in finals] == [None, "cancelled", None]
    cancelled = httpx.get(batched.base_url + "/v1/chat/completions/row-1").json()
    assert cancelled["usage"]["completion_tokens"] < 400


def test_row_whose_media_fails_late_fails_alone(batched, monkeypatch):
    """Corrupt one request's vision grid after preprocessing: the real vision tower rejects it in prefill."""
    original = main.tokenize

    def corrupting(*args):
        prompt, inputs = original(*args)
        if "CORRUPT" in prompt:
            inputs["image_grid_thw"] = inputs["image_grid_thw"] * 3
        return prompt, inputs

    monkeypatch.setattr(main, "tokenize", corrupting)
    bad = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri(size=(64, 64))}},
        {"type": "text", "text": "CORRUPT"}]}], "max_tokens": 20, "stream": True}
    good = [long_request(max_tokens=200, seed=s) for s in (1, 2)]
    alone = [outcome(stream_events(batched.base_url, {**b, "stream_options": {"include_usage": True}})[2])
             for b in good]
    bodies = [{**good[0], "stream_options": {"include_usage": True}}, bad,
              {**good[1], "stream_options": {"include_usage": True}}]
    results = staggered_streams(batched.base_url, bodies, gap=0.05)
    assert json.loads(results[1][-2]["data"])["error"]["code"] == "generation_failed"
    assert [outcome(results[0]), outcome(results[2])] == alone


def test_many_streams_complete_with_correct_usage_and_resume_works(batched):
    bodies = [long_request(max_tokens=50 + i, session_id=f"crowd-{i}", stream_options={"include_usage": True})
              for i in range(10)]
    def disconnect_and_resume() -> list[dict]:
        first = stream_events(batched.base_url, bodies[0], limit=3)[2]
        return first + stream_events(batched.base_url, bodies[0], headers={"Last-Event-ID": first[-1]["id"]})[2]

    results = in_threads([disconnect_and_resume] + [lambda b=b: stream_events(batched.base_url, b)[2]
                                                    for b in bodies[1:]])
    for i in range(10):
        events = results[i]
        assert [e["id"] for e in events] == [f"crowd-{i}:{n}" for n in range(len(events))]
        assert json.loads(events[-2]["data"])["usage"]["completion_tokens"] == 50 + i


def test_batch_size_one_decodes_one_request_at_a_time(make_server):
    srv = make_server(max_batch_size=1)
    run_staggered(srv.base_url, [request(i, seed=i, temperature=1.0) for i in range(3)], gap=0.01)
    steps, rows = batch_sizes(srv.base_url)
    assert steps > 0 and rows == steps
