"""The engine's KV cache, decode step and prefill against `model.generate()` (#14).

`generate()` decodes one prompt over transformers' DynamicCache: the reference every row
must match token for token, whatever the slot cache, the compiled step or the prefill's
chunks do. These tests drive main.Batch and main.Prefill directly on the tiny model;
tests/test_batching.py does the same through the HTTP API.
"""

from __future__ import annotations

import json
import logging
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import main
from helpers import (SAY_HELLO, joined_text, mp4_data_uri, png_data_uri, post, session_body, stream_events,
                     video_message, wait_generating, wait_until)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, processor


def prompt(processor, text: str, image: bool = False, video: bool = False):
    rng = np.random.default_rng(len(text))
    content = [{"type": "text", "text": text}]
    images = videos = None
    if image:
        content.insert(0, {"type": "image"})
        images = [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))]
    if video:
        content.insert(0, {"type": "video"})
        videos = [rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    extra = {"do_sample_frames": False} if video else {}
    return processor(text=[rendered], images=images, videos=videos, return_tensors="pt", **extra)


def reference(model, inputs, tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


class Greedy:
    """What the engine keeps per row, reduced to greedy decoding."""

    def __init__(self, name: str, prefill: main.Prefill, tokens: int):
        self.name, self.tokens = name, tokens
        self.position, self.rope_delta = prefill.length, prefill.rope_delta
        self.last = int(prefill.logits.argmax())
        self.out = [self.last]


def prefill_all(model, inputs, chunk: int) -> main.Prefill:
    prefill = main.Prefill(model, inputs)
    while not prefill.finished:
        prefill.run(chunk)
    return prefill


def decode(batch: main.Batch, steps: int | None = None) -> None:
    """Greedy steps for every row (until all rows are done, or `steps` steps); done rows leave."""
    while batch.rows and steps != 0:
        logits = batch.forward()
        done = set()
        for row, token in zip(list(batch.rows), logits.argmax(-1).tolist()):
            row.last = token
            row.out.append(token)
            if len(row.out) >= row.tokens:
                done.add(row)
        batch.drop(done)
        steps = None if steps is None else steps - 1


def run_staggered(model, processor, compiled: bool, slots: int, chunk: int = 10 ** 9) -> list[Greedy]:
    """Text and image prompts joining at different steps and leaving at different lengths."""
    specs = [("text", "hello " * 3, False, 40), ("image", "what is this " * 2, True, 25),
             ("long text", "tell me more " * 9, False, 50), ("image 2", "and this?", True, 33)]
    batch = main.Batch()
    with torch.inference_mode():
        batch.prepare(model, slots, compiled)
        rows = []
        for i, (name, text, image, tokens) in enumerate(specs):
            prefill = prefill_all(model, prompt(processor, text, image=image), chunk)
            row = Greedy(name, prefill, tokens)
            batch.join([row], prefill.cache, prefill.length)
            rows.append(row)
            decode(batch, steps=4 + 3 * i)  # the others move on before the next one joins
        decode(batch)
    return rows


def assert_match_generate(model, processor, rows: list[Greedy]) -> None:
    specs = {"text": ("hello " * 3, False), "image": ("what is this " * 2, True),
             "long text": ("tell me more " * 9, False), "image 2": ("and this?", True)}
    for row in rows:
        text, image = specs[row.name]
        assert row.out == reference(model, prompt(processor, text, image=image), row.tokens), row.name


def test_slot_cache_rows_match_generate_joining_and_leaving_at_different_steps(tiny):
    model, processor = tiny
    assert_match_generate(model, processor, run_staggered(model, processor, compiled=False, slots=4))


def test_rows_past_the_initial_capacity_grow_the_cache_and_stay_exact(tiny, monkeypatch):
    monkeypatch.setattr(main, "INITIAL_CACHE_COLUMNS", 16)
    model, processor = tiny
    rows = run_staggered(model, processor, compiled=False, slots=4)
    assert_match_generate(model, processor, rows)


def test_chunked_prefill_gives_the_same_cache_logits_and_tokens_as_one_piece(tiny):
    model, processor = tiny
    cases = [prompt(processor, "a longer question " * 6), prompt(processor, "describe it", image=True),
             prompt(processor, "what happens here", video=True)]
    with torch.inference_mode():
        for inputs in cases:
            whole = prefill_all(model, inputs, 10 ** 9)
            for chunk in (1, 7, 32):
                pieces = prefill_all(model, inputs, chunk)
                assert pieces.length == whole.length and pieces.rope_delta == whole.rope_delta
                torch.testing.assert_close(pieces.logits, whole.logits, rtol=1e-4, atol=1e-5)
                for mine, theirs in zip(pieces.cache.layers, whole.cache.layers):
                    torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_rows_match_generate(tiny):
    model, processor = tiny
    assert_match_generate(model, processor, run_staggered(model, processor, compiled=False, slots=4, chunk=5))


def test_compiled_decode_step_matches_generate(tiny):
    """COMPILE=1 on the CPU: torch.compile'd steps at padded batch sizes (1, 2, 4), joins and leaves."""
    model, processor = tiny
    assert_match_generate(model, processor, run_staggered(model, processor, compiled=True, slots=3))


def test_compile_failure_falls_back_to_eager_and_says_so_once(tiny, monkeypatch, caplog):
    """A backend that cannot compile is a fault the CPU here does not produce: injected."""
    def no_compiler(function, **kwargs):
        def broken(*args, **kw):
            raise RuntimeError("no working C++ compiler")
        return broken

    monkeypatch.setattr(torch, "compile", no_compiler)
    model, processor = tiny
    with caplog.at_level(logging.WARNING, logger="qwen3vl_server"):
        rows = run_staggered(model, processor, compiled=True, slots=4)
    assert_match_generate(model, processor, rows)
    warnings = [r for r in caplog.records if "compiled decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0].getMessage()


# ----------------------------------------------------------------------------- through the API

def outputs(base_url: str, bodies: list[dict]) -> list[tuple[str, str, str]]:
    results = []
    for body in bodies:
        _, status, events = stream_events(base_url, {**body, "stream": True})
        assert status == 200
        finish = [json.loads(e["data"])["choices"][0]["finish_reason"]
                  for e in events if '"finish_reason":"' in e["data"]]
        results.append((joined_text(events, "reasoning_content"), joined_text(events, "content"), finish[-1]))
    return results


API_BODIES = [
    {"messages": SAY_HELLO, "max_tokens": 40, "temperature": 0},
    {"messages": [{"role": "user", "content": "Tell me a long story. " * 12}], "max_tokens": 30, "seed": 3,
     "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}},
                                               {"type": "text", "text": "What is it?"}]}],
     "max_tokens": 30, "seed": 4, "temperature": 0.8, "top_p": 0.9},
    {"messages": video_message(mp4_data_uri()), "max_tokens": 20, "temperature": 0},
]


@pytest.fixture(scope="module")
def default_outputs(make_module_server):
    return outputs(make_module_server().base_url, API_BODIES)


def test_prompts_prefilled_in_small_chunks_stream_what_one_piece_streams(make_server, default_outputs):
    srv = make_server(max_prefill_tokens_per_step=3)
    assert outputs(srv.base_url, API_BODIES) == default_outputs


def test_compile_1_server_warms_up_at_load_and_streams_what_eager_streams(make_server, default_outputs):
    srv = make_server(compile="1", max_batch_size=2)
    step = srv.state.worker.batch.step
    assert step.compiled  # warmed up at load, before /health said ready
    assert outputs(srv.base_url, API_BODIES) == default_outputs


def test_cancel_during_a_chunked_prefill_ends_the_request_before_its_first_token(make_server):
    """Regression: cancel is checked between prefill chunks, not only between tokens. A
    running stream makes the long prompt go in one-token chunks (chunks only run while
    other rows decode)."""
    srv = make_server(max_prefill_tokens_per_step=1)
    runner = {"messages": SAY_HELLO, "max_tokens": 3000, "ignore_eos": True, "stream": True,
              "session_id": "keeps-decoding"}
    background = threading.Thread(target=stream_events, args=(srv.base_url, runner), daemon=True)
    background.start()
    wait_generating(srv.base_url, "keeps-decoding")
    result = {}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 5,
                   "session_id": "long-prompt"}
    waiting = threading.Thread(target=lambda: result.update(response=post(srv.base_url, long_prompt)))
    waiting.start()
    wait_until(lambda: session_body(srv.base_url, "long-prompt").get("status") == "in_progress")
    assert httpx.post(f"{srv.base_url}/v1/cancel/long-prompt").status_code == 200
    waiting.join(timeout=60)
    body = result["response"].json()
    assert body["choices"][0]["end_reason"] == "cancelled"
    assert body["usage"]["completion_tokens"] == 0  # it never got to decode
    httpx.post(f"{srv.base_url}/v1/cancel/keeps-decoding")
    background.join(timeout=60)
