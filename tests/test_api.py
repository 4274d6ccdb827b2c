"""End-to-end: `python main.py` on the tiny checkpoint, driven by the OpenAI SDK and httpx."""

import asyncio
import json

import httpx
import openai
import pytest

from helpers import SAY_HELLO, chunk_payloads, event_index, joined_text, mp4_data_uri, png_data_uri, stream_events


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused")


def test_models_endpoint_lists_the_served_model(client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [str(tiny_model_dir)]


def test_health_reports_ready_and_model_id(base_url, tiny_model_dir):
    body = httpx.get(base_url + "/health").json()
    assert body["status"] == "ready" and body["model"] == str(tiny_model_dir)


def test_openai_sdk_non_streaming_returns_chat_completion_with_usage(client, tiny_model_dir):
    result = client.chat.completions.create(model="any", messages=SAY_HELLO, max_tokens=12, seed=1, temperature=1.0)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.model == str(tiny_model_dir)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    text = (choice.message.content or "") + (choice.message.model_extra.get("reasoning_content") or "")
    assert text
    assert result.usage.completion_tokens <= 12 and result.usage.prompt_tokens > 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_openai_sdk_streaming_yields_role_then_deltas_then_finish_and_usage(client):
    stream = client.chat.completions.create(model="any", messages=SAY_HELLO, max_tokens=10, seed=2, temperature=1.0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    deltas = [c.choices[0].delta for c in chunks[1:] if c.choices and not c.choices[0].finish_reason]
    assert all((d.content or d.model_extra.get("reasoning_content")) for d in deltas)


def test_async_openai_sdk_streamed_and_not(base_url):
    async def run():
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused")
        whole = await client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=8, seed=3,
                                                     temperature=1.0)
        stream = await client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=8, seed=3,
                                                      temperature=1.0, stream=True)
        parts = [c async for c in stream]
        return whole, parts

    whole, parts = asyncio.run(run())
    streamed = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "") for c in parts if c.choices)
    assert streamed == whole.choices[0].message.model_extra["reasoning_content"]


def test_same_seed_gives_same_output_and_other_seed_differs(client):
    def run(seed):
        r = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=24, seed=seed, temperature=1.0)
        return r.choices[0].message.model_extra.get("reasoning_content"), r.choices[0].message.content

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_temperature_zero_is_greedy_and_repeatable(client):
    outs = {client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=16, temperature=0).choices[0]
            .message.model_extra.get("reasoning_content") for _ in range(2)}
    assert len(outs) == 1


def test_image_data_uri_adds_vision_tokens_to_the_prompt(client):
    plain = client.chat.completions.create(model="m", messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe."}]}], max_tokens=4, seed=1)
    with_image = client.chat.completions.create(model="m", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}},
                                     {"type": "text", "text": "Describe."}]}], max_tokens=4, seed=1)
    # 96x64 at patch 16 and merge 2 is 6x4 patches -> 6 image tokens plus the vision start/end markers
    assert with_image.usage.prompt_tokens == plain.usage.prompt_tokens + 6 + 2


def test_video_data_uri_is_decoded_and_counted(client):
    result = client.chat.completions.create(model="m", messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": mp4_data_uri()}},
                                     {"type": "text", "text": "What happens?"}]}], max_tokens=4, seed=1,
        stream=False)
    plain = client.chat.completions.create(model="m", messages=[
        {"role": "user", "content": [{"type": "text", "text": "What happens?"}]}], max_tokens=4, seed=1)
    assert result.usage.prompt_tokens > plain.usage.prompt_tokens + 8
    assert result.choices[0].finish_reason in ("stop", "length")


def test_stop_string_ends_output_before_it_with_finish_reason_stop(client):
    base = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=40, seed=5, temperature=1.0)
    raw = base.choices[0].message.model_extra["reasoning_content"]
    assert "</think>" not in raw and len(raw) > 12
    stop = raw[8:11]
    cut = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=40, seed=5, temperature=1.0,
                                         stop=[stop, "never-appears"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.model_extra["reasoning_content"] == raw[:raw.find(stop)]


def test_penalties_change_sampling(client):
    def run(**kw):
        r = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=30, temperature=0, **kw)
        return r.choices[0].message.model_extra["reasoning_content"]

    greedy = run()
    assert run(frequency_penalty=2.0) != greedy
    assert run(presence_penalty=2.0) != greedy


def test_min_tokens_and_ignore_eos_give_fixed_lengths(client):
    r = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=25, seed=9,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 25 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="m", messages=SAY_HELLO, max_tokens=30, seed=9,
                                       extra_body={"min_tokens": 20})
    assert r.usage.completion_tokens >= 20


def test_reasoning_split_matches_raw_generate_around_think_close(client, tiny_model_dir):
    """The tiny model closes its think block when greedily answering "Say hello." (see tiny_model.py):
    the server must split exactly where raw `generate` emits `</think>`, streamed and not."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    messages = [{"role": "user", "content": "Say hello."}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    raw = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    reasoning, closed, content = raw.partition("</think>")
    assert closed and reasoning and content.strip()
    body = dict(model="m", messages=messages, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    message = client.chat.completions.create(**body).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (reasoning, content)
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content


def test_raw_sse_ids_are_session_and_consecutive_index_with_done_last(base_url):
    headers, status, events = stream_events(base_url, {"messages": SAY_HELLO, "max_tokens": 12, "seed": 4,
                                                       "stream": True, "session_id": "raw-sse-1"})
    assert status == 200 and headers["x-session-id"] == "raw-sse-1"
    assert [e["id"] for e in events] == [f"raw-sse-1:{i}" for i in range(len(events))]
    assert events[-1]["data"] == "[DONE]"
    payloads = chunk_payloads(events[:-1])
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_generated_session_id_is_returned_in_header(base_url):
    headers, _, events = stream_events(base_url, {"messages": SAY_HELLO, "max_tokens": 3, "stream": True})
    sid = headers["x-session-id"]
    assert sid and all(e["id"].startswith(sid + ":") for e in events)
    assert event_index(events[-1]) == len(events) - 1


def test_non_streaming_response_carries_session_id_header(base_url):
    response = httpx.post(base_url + "/v1/chat/completions", json={"messages": SAY_HELLO, "max_tokens": 3},
                          timeout=30)
    assert response.status_code == 200
    assert response.headers["x-session-id"] == response.json()["session_id"]


def test_non_streaming_equals_drained_stream_for_same_seed(base_url):
    body = {"messages": SAY_HELLO, "max_tokens": 20, "seed": 21, "temperature": 1.0}
    whole = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=30).json()
    _, _, events = stream_events(base_url, {**body, "stream": True})
    assert joined_text(events, "reasoning_content") == (whole["choices"][0]["message"]["reasoning_content"] or "")
    assert joined_text(events, "content") == whole["choices"][0]["message"]["content"]
    assert json.loads(events[-2]["data"])["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_image_url_may_be_a_bare_string(base_url):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": png_data_uri()},
                                                      {"type": "text", "text": "Describe."}]}], "max_tokens": 2}
    response = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] > 8
