"""The Responses API on the durable log, driven by the official `openai` SDK (issue #10)."""

import signal

import httpx
import openai
import pytest

import main
from helpers import InProcessServer, ServerProcess, break_decode_step, wait_ready

EOS = 2  # <|im_end|> in tests/tiny_model.py's vocabulary (checked in the fixture)
# Greedy "Say hello." thinks, closes </think>, answers; EOS is masked for 30 tokens, then forced: completed.
GREEDY = {"input": "Say hello.", "temperature": 0, "max_output_tokens": 40,
          "extra_body": {"min_tokens": 30, "logit_bias": {str(EOS): 100}}}


def long_body(tokens: int) -> dict:
    """A seeded run of exactly `tokens` tokens ending in a forced EOS: status completed."""
    return {"input": "Tell me a long story.", "temperature": 1.0, "max_output_tokens": tokens + 10,
            "extra_body": {"min_tokens": tokens, "logit_bias": {str(EOS): 100}, "seed": 7}}


LONG = long_body(3000)


@pytest.fixture(scope="module")
def client(base_url, tiny_model_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<|im_end|>") == EOS
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def texts(response) -> tuple[str, str]:
    """(reasoning, answer) of a Response."""
    reasoning = "".join(c.text for item in response.output if item.type == "reasoning" for c in item.content or [])
    return reasoning, response.output_text


def events_text(events) -> tuple[str, str]:
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    return reasoning, "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_streamed_create_and_stream_helper_equal_retrieve(client):
    """create(stream=True) yields the documented order; the SDK's stream helper's
    get_final_response() equals retrieve() (text, reasoning, usage)."""
    events = list(client.responses.create(model="m", stream=True, **GREEDY))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type == "response.completed"
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.content_part.added")
    reasoning, answer = events_text(events)
    assert reasoning and answer
    with client.responses.stream(model="m", **GREEDY) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    stored = client.responses.retrieve(final.id)
    assert texts(final) == texts(stored) == (reasoning, answer)
    assert final.usage == stored.usage and stored.usage.output_tokens == 31
    assert 0 < stored.usage.output_tokens_details.reasoning_tokens < 30
    assert stored.status == "completed" and [o.type for o in stored.output] == ["reasoning", "message"]


def test_non_streamed_create_returns_the_finished_response(client):
    response = client.responses.create(model="m", **GREEDY)
    assert response.status == "completed" and texts(response)[1]
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_background_stream_dropped_and_resumed_has_no_gap_and_equals_an_uninterrupted_run(client):
    """Read k events, drop; retrieve(stream=True, starting_after=k-1): sequence numbers
    0..n once each and the text of an uninterrupted seeded run; the same again through
    responses.stream(response_id=..., starting_after=...)."""
    body = long_body(100)
    whole = list(client.responses.create(model="m", stream=True, **body))
    stream = client.responses.create(model="m", stream=True, background=True, **body)
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 8:
            break
    stream.close()
    rest = list(client.responses.retrieve(seen[0].response.id, stream=True, starting_after=7))
    joined = seen + rest
    assert [e.sequence_number for e in joined] == list(range(len(joined)))
    assert events_text(joined) == events_text(whole)
    with client.responses.stream(response_id=seen[0].response.id, starting_after=3) as again:
        later = list(again)
        final = again.get_final_response()
    assert [e.sequence_number for e in later] == list(range(4, len(joined)))
    assert texts(final)[1] == events_text(whole)[1]


def test_background_create_returns_at_once_and_runs_without_a_client(client):
    body = {**LONG, "max_output_tokens": 40, "extra_body": {"ignore_eos": True, "seed": 7}}
    created = client.responses.create(model="m", background=True, **body)
    assert created.status in ("queued", "in_progress") and created.background
    events = list(client.responses.retrieve(created.id, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    final = client.responses.retrieve(created.id)
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"


def test_cancel_mid_stream_stops_generation_and_is_idempotent(client):
    stream = client.responses.create(model="m", stream=True, background=True, **LONG)
    first = next(iter(stream))
    stream.close()
    cancelled = client.responses.cancel(first.response.id)
    assert cancelled.status == "cancelled"
    tokens = cancelled.usage.output_tokens
    again = client.responses.cancel(first.response.id)
    assert again.status == "cancelled" and again.usage.output_tokens == tokens < 3000
    assert client.responses.retrieve(first.response.id).usage.output_tokens == tokens
    events = list(client.responses.retrieve(first.response.id, stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.status == "cancelled"


def test_delete_then_404_and_input_items(client):
    response = client.responses.create(model="m", **GREEDY)
    items = client.responses.input_items.list(response.id)
    assert [i.role for i in items.data] == ["user"] and items.data[0].content[0].text == "Say hello."
    assert client.responses.delete(response.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_unknown_previous_response_is_404_naming_the_param(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="m", input="hi", previous_response_id="resp_nope")
    assert error.value.body["param"] == "previous_response_id"


def test_unsupported_fields_are_400_naming_the_param(client):
    cases = [({"tools": [{"type": "web_search"}]}, "tools"),
             ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
             ({"include": ["file_search_call.results"]}, "include"),
             ({"extra_body": {"conversation": "conv_1"}}, "conversation")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.responses.create(model="m", input="hi", **extra)
        assert error.value.body["param"] == param


def test_input_image_data_uri_adds_vision_tokens(client):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    plain = client.responses.create(model="m", input="What is it?", max_output_tokens=2)
    seen = client.responses.create(model="m", max_output_tokens=2, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": uri, "detail": "auto"},
        {"type": "input_text", "text": "What is it?"}]}])
    assert seen.usage.input_tokens > plain.usage.input_tokens + 4


def test_previous_response_id_chains_two_turns_into_the_prompt(tiny_model_dir, monkeypatch):
    """The second prompt holds the first turn (its input and answer, not its reasoning)."""
    prompts = []
    original = main.tokenize

    def recording(*args):
        prompt, inputs = original(*args)
        prompts.append(prompt)
        return prompt, inputs

    monkeypatch.setattr(main, "tokenize", recording)
    with InProcessServer(tiny_model_dir, preload_model=True) as srv:
        wait_ready(srv.base_url)
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        first = client.responses.create(model="m", **GREEDY)
        second = client.responses.create(model="m", input="And again?", previous_response_id=first.id,
                                         max_output_tokens=2)
        assert second.previous_response_id == first.id
    reasoning, answer = texts(first)
    assert "Say hello." in prompts[-1] and answer in prompts[-1] and "And again?" in prompts[-1]
    assert reasoning not in prompts[-1]


def test_failure_mid_stream_ends_with_response_failed(tiny_model_dir):
    """A crash inside a decode step (injected: the real model does not fail) ends the
    stream with response.failed; the SDK stops, and get_final_response() raises."""
    with InProcessServer(tiny_model_dir, preload_model=True) as srv:
        wait_ready(srv.base_url)
        break_decode_step(srv.state, at=4)
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        with client.responses.stream(model="m", **GREEDY) as stream:
            events = list(stream)
            with pytest.raises(RuntimeError):
                stream.get_final_response()
        assert events[-1].type == "response.failed" and events[-1].response.error.message


def persistent(tiny_model_dir, tmp_path, name: str) -> ServerProcess:
    return ServerProcess(tiny_model_dir, tmp_path / f"{name}.log", PERSIST_SESSIONS="1",
                         SESSIONS_DB_PATH=str(tmp_path / "s.db"))


def test_restart_replays_and_kill_9_reads_as_failed_interrupted(tiny_model_dir, tmp_path):
    first = persistent(tiny_model_dir, tmp_path, "a").start()
    client = openai.OpenAI(base_url=first.base_url + "/v1", api_key="unused", max_retries=0)
    done = client.responses.create(model="m", **GREEDY)
    running = client.responses.create(model="m", background=True, **LONG)
    stream = client.responses.retrieve(running.id, stream=True)
    seen = [event for _, event in zip(range(10), stream)]
    first.stop(signal.SIGKILL)
    second = persistent(tiny_model_dir, tmp_path, "b").start()
    try:
        client = openai.OpenAI(base_url=second.base_url + "/v1", api_key="unused", max_retries=0)
        assert client.responses.retrieve(done.id).output_text == done.output_text
        replay = list(client.responses.retrieve(done.id, stream=True))
        assert replay[-1].type == "response.completed"
        crashed = client.responses.retrieve(running.id)
        assert crashed.status == "failed" and crashed.error.code == "interrupted"
        raw = httpx.get(f"{second.base_url}/v1/responses/{running.id}", params={"stream": "true"})
        ids = [int(line[4:]) for line in raw.text.splitlines() if line.startswith("id: ")]
        assert ids == list(range(len(ids))) and len(ids) >= len(seen)
    finally:
        second.stop()
