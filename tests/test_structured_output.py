"""Structured output and the reasoning budget, end to end: the real tiny checkpoint through
the real server. The model is random, so only the constraint can make it write JSON that
parses and validates: these tests hold because the grammar holds.

The random model rarely closes its think block by itself; `max_reasoning_tokens` (or a
logit_bias on `</think>`, as a client could send) ends it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from helpers import SAY_HELLO, joined_text, stream_events, wait_ready

CLOSE = 401  # </think> in tests/tiny_model.py's vocabulary (checked in the fixture)
EOS = 2
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "color", "tags", "address"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


class Address(BaseModel):
    city: str = Field(max_length=10)
    zip: str = Field(pattern="^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)
    address: Address


@pytest.fixture(scope="module")
def srv(make_module_server, tiny_model_dir):
    """Room for a hundred requests at once: 16 decode together, the rest queue."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.convert_tokens_to_ids(["</think>", "<|im_end|>"]) == [CLOSE, EOS]
    return make_module_server(max_batch_size=16, max_queue=128)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def body(seed: int, **extra) -> dict:
    return {"messages": SAY_HELLO, "max_tokens": 600, "seed": seed, "max_reasoning_tokens": 8,
            "response_format": PERSON_FORMAT, **extra}


async def post_all(base_url: str, bodies: list[dict]) -> list[dict]:
    """Send every body at once (so they batch): (reasoning, content, finish_reason, usage) each;
    streamed bodies are read to the end and assembled from their chunks."""
    async with httpx.AsyncClient(timeout=300) as http:
        return await asyncio.gather(*(post_one(http, base_url, b) for b in bodies))


async def post_one(http: httpx.AsyncClient, base_url: str, body: dict) -> dict:
    if not body.get("stream"):
        reply = (await http.post(base_url + "/v1/chat/completions", json=body)).json()
        choice = reply["choices"][0]
        return {"reasoning": choice["message"]["reasoning_content"] or "", "content": choice["message"]["content"],
                "finish": choice["finish_reason"], "usage": reply["usage"]}
    async with http.stream("POST", base_url + "/v1/chat/completions",
                           json={**body, "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) async for line in response.aiter_lines()
                  if line.startswith("data: {")]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    return {"reasoning": "".join(d["delta"].get("reasoning_content") or "" for d in deltas),
            "content": "".join(d["delta"].get("content") or "" for d in deltas),
            "finish": next(d["finish_reason"] for d in deltas if d["finish_reason"]), "usage": chunks[-1]["usage"]}


def test_a_hundred_seeded_json_schema_answers_all_parse_and_validate(srv):
    """Nested objects, an array, an enum, integer bounds, a pattern, required fields and no
    extra properties; half streamed, half not, all sent at once so they decode together."""
    bodies = [body(seed, stream=seed % 2 == 0) for seed in range(100)]
    results = asyncio.run(post_all(srv.base_url, bodies))
    for seed, result in enumerate(results):
        assert result["finish"] == "stop", (seed, result)
        jsonschema.validate(json.loads(result["content"]), PERSON)
        assert result["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 9


def test_sdk_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(model="m", messages=SAY_HELLO, response_format=Person, max_tokens=600,
                                               seed=3, extra_body={"max_reasoning_tokens": 8})
    assert isinstance(completion.choices[0].message.parsed, Person)
    assert completion.choices[0].finish_reason == "stop"


def test_sdk_stream_helper_assembles_the_parsed_object(client):
    with client.chat.completions.stream(model="m", messages=SAY_HELLO, response_format=Person, max_tokens=600,
                                        seed=4, extra_body={"max_reasoning_tokens": 8}) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "content.delta" in kinds and isinstance(final.choices[0].message.parsed, Person)
    again = client.chat.completions.parse(model="m", messages=SAY_HELLO, response_format=Person, max_tokens=600,
                                          seed=4, extra_body={"max_reasoning_tokens": 8})
    assert again.choices[0].message.parsed == final.choices[0].message.parsed  # streamed = not streamed


def test_json_object_answers_that_finish_are_objects(srv):
    """Any object: nothing bounds its strings, so a random model may still be inside one at
    max_tokens (finish_reason length, as OpenAI documents for JSON mode)."""
    bodies = [body(seed, response_format={"type": "json_object"}, max_tokens=400) for seed in range(16)]
    results = asyncio.run(post_all(srv.base_url, bodies))
    finished = [r for r in results if r["finish"] == "stop"]
    assert len(finished) >= 12
    assert all(isinstance(json.loads(r["content"]), dict) for r in finished)
    assert all(r["finish"] == "length" for r in results if r not in finished)


def test_max_tokens_inside_the_json_is_finish_reason_length(srv):
    [result] = asyncio.run(post_all(srv.base_url, [body(5, max_tokens=25)]))
    assert result["finish"] == "length" and result["usage"]["completion_tokens"] == 25
    with pytest.raises(ValueError):
        json.loads(result["content"])


def test_the_constraint_starts_only_after_think_closes(srv):
    """Greedy, so the reasoning must equal the unconstrained run's token for token: the
    grammar touches nothing before `</think>`, early (forced by logit_bias), at the tiny
    model's own close (step 6), or late (a budget after 40 tokens it never closes by itself)."""
    cases = [{"logit_bias": {str(CLOSE): 100}}, {}, {"logit_bias": {str(CLOSE): -100}, "max_reasoning_tokens": 40}]
    plain = [{"messages": SAY_HELLO, "temperature": 0, "max_tokens": 600, **case} for case in cases]
    constrained = [{**b, "response_format": PERSON_FORMAT} for b in plain]
    results = asyncio.run(post_all(srv.base_url, plain + constrained))
    for free, bound in zip(results[:3], results[3:]):
        assert bound["reasoning"] == free["reasoning"] and bound["finish"] == "stop"
        jsonschema.validate(json.loads(bound["content"]), PERSON)
    reasoning = [r["reasoning"] for r in results[3:]]
    assert reasoning[0] == "" and 0 < len(reasoning[1]) < len(reasoning[2])
    assert results[5]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 41
    with pytest.raises(ValueError):
        json.loads(reasoning[2])  # free text, not JSON


def test_reasoning_budget_forces_the_answer(srv):
    """A budget of 5 on a row that would never close its think block by itself: `</think>`
    is forced, the answer comes, reasoning_tokens = budget + 1; effort none skips thinking."""
    never = {"messages": SAY_HELLO, "max_tokens": 30, "seed": 9, "logit_bias": {str(CLOSE): -100}}
    streamed, plain, effort = asyncio.run(post_all(srv.base_url, [
        {**never, "max_reasoning_tokens": 5, "stream": True}, {**never, "max_reasoning_tokens": 5},
        {**never, "reasoning_effort": "none"}]))
    for result in (streamed, plain):
        assert result["content"] and result["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    assert streamed["reasoning"] == plain["reasoning"] and streamed["content"] == plain["content"]
    assert effort["reasoning"] == "" and effort["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1


def test_reasoning_is_sent_under_both_names_unless_a_field_is_turned_off(srv, make_server):
    events = stream_events(srv.base_url, {"messages": SAY_HELLO, "temperature": 0, "max_tokens": 12, "stream": True})[2]
    assert joined_text(events, "reasoning") == joined_text(events, "reasoning_content") != ""
    reply = httpx.post(srv.base_url + "/v1/chat/completions",
                       json={"messages": SAY_HELLO, "temperature": 0, "max_tokens": 12}).json()
    message = reply["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == joined_text(events, "reasoning")
    only = make_server(reasoning_fields="reasoning")
    events = stream_events(only.base_url, {"messages": SAY_HELLO, "temperature": 0, "max_tokens": 12, "stream": True})[2]
    reply = httpx.post(only.base_url + "/v1/chat/completions",
                       json={"messages": SAY_HELLO, "temperature": 0, "max_tokens": 12}).json()
    assert joined_text(events, "reasoning_content") == "" and joined_text(events, "reasoning") != ""
    assert "reasoning_content" not in reply["choices"][0]["message"] and reply["choices"][0]["message"]["reasoning"]


@pytest.mark.parametrize("extra, param, code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "invalid_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", "invalid_value"),
    ({"max_reasoning_tokens": -1}, "max_reasoning_tokens", "invalid_value"),
    ({"reasoning_effort": "huge"}, "reasoning_effort", "invalid_value"),
])
def test_what_cannot_be_constrained_is_a_400_naming_the_param(srv, extra, param, code):
    reply = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": SAY_HELLO, **extra})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["code"] == code and error["param"].startswith(param), error


def test_responses_text_format_json_schema_and_sdk_parse(client):
    """The Responses API's text.format (flat: type, name, schema, strict) goes the same way."""
    response = client.responses.create(
        model="m", input="Say hello.", max_output_tokens=600,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        reasoning={"effort": "minimal"}, extra_body={"seed": 11, "max_reasoning_tokens": 8})
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.usage.output_tokens_details.reasoning_tokens <= 9
    parsed = client.responses.parse(model="m", input="Say hello.", text_format=Person, max_output_tokens=600,
                                    extra_body={"seed": 12, "max_reasoning_tokens": 8})
    assert isinstance(parsed.output_parsed, Person)


def test_reasoning_tokens_survive_a_restart_with_sqlite(tiny_model_dir, tmp_path):
    """The Outcome keeps reasoning_tokens in SQLite: a body read after a restart reports them."""
    from helpers import InProcessServer

    db = str(tmp_path / "sessions.db")
    never = {"messages": SAY_HELLO, "max_tokens": 12, "seed": 9, "logit_bias": {str(CLOSE): -100},
             "max_reasoning_tokens": 3, "session_id": "budgeted"}
    with InProcessServer(tiny_model_dir, preload_model=True, session_store="sqlite", sessions_db_path=db) as first:
        wait_ready(first.base_url)
        before = httpx.post(first.base_url + "/v1/chat/completions", json=never).json()["usage"]
    with InProcessServer(tiny_model_dir, session_store="sqlite", sessions_db_path=db) as second:
        after = httpx.get(second.base_url + "/v1/chat/completions/budgeted").json()["usage"]
    assert before == after and after["completion_tokens_details"]["reasoning_tokens"] == 4
