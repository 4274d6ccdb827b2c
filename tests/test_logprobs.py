"""logprobs / top_logprobs on chat completions, streamed and not, in OpenAI's shapes.

What the server promises: every generated token whose text reaches the client (reasoning
and content, `</think>` included; not the EOS that ends a choice, nor tokens swallowed by a
stop string) is listed once, in order, with the first delta that carries text at or after
it. Logprobs are log_softmax of the scores the row's sampler gets (after logit_bias,
penalties and the min_tokens mask, before temperature, top-k and top-p).
"""

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helpers import InProcessServer, stream_events, wait_ready

HELLO = [{"role": "user", "content": "Say hello."}]  # the tiny model closes its think block at step 6


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, max_batch_size=8) as server:
        wait_ready(server.base_url)
        yield server


def complete(base_url: str, **body) -> dict:
    response = httpx.post(base_url + "/v1/chat/completions", json={"messages": HELLO, **body}, timeout=60)
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())
    return response.json()


def streamed_chunks(base_url: str, **body) -> list[dict]:
    """Every chunk of a streamed run, each validated as a ChatCompletionChunk."""
    _, status, events = stream_events(base_url, {"messages": HELLO, "stream": True, **body})
    assert status == 200
    chunks = [e["data"] for e in events if e["data"] != "[DONE]"]
    for data in chunks:
        ChatCompletionChunk.model_validate_json(data)
    return [json.loads(data) for data in chunks]


def streamed_logprobs(chunks: list[dict], index: int = 0) -> list[dict]:
    """Concatenation of the logprobs entries of one choice's chunks."""
    return [entry for chunk in chunks for choice in chunk["choices"] if choice["index"] == index
            and choice["logprobs"] for entry in choice["logprobs"]["content"]]


def test_greedy_logprobs_list_each_token_with_its_sorted_top_alternatives(srv):
    body = complete(srv.base_url, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
    entries = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert 0 < len(entries) <= body["usage"]["completion_tokens"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy picks the most probable token: its own logprob is the first alternative's
        assert {k: entry[k] for k in ("token", "logprob", "bytes")} == top[0]
        assert entry["logprob"] <= 0


def test_token_bytes_add_up_to_the_streamed_text(srv):
    """Reasoning, the `</think>` tag and content: the listed tokens spell the whole output."""
    body = complete(srv.base_url, max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    message = body["choices"][0]["message"]
    assert message["content"], "the tiny model should close its think block in 24 tokens"
    spelled = b"".join(bytes(e["bytes"]) for e in body["choices"][0]["logprobs"]["content"])
    assert spelled.decode(errors="replace") == message["reasoning_content"] + "</think>" + message["content"]
    assert len(body["choices"][0]["logprobs"]["content"]) == 24


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5, "top_k": 20, "top_p": 0.9}])
def test_streamed_chunks_carry_exactly_the_non_streamed_logprobs(srv, sampling):
    request = {"max_tokens": 40, "ignore_eos": True, "logprobs": True, "top_logprobs": 3, **sampling}
    whole = complete(srv.base_url, **request)
    chunks = streamed_chunks(srv.base_url, **request)
    assert streamed_logprobs(chunks) == whole["choices"][0]["logprobs"]["content"]
    for chunk in chunks:
        for choice in chunk["choices"]:
            text = choice["delta"].get("content") or choice["delta"].get("reasoning_content")
            if choice["finish_reason"] is None and not choice["delta"].get("role"):
                assert text and choice["logprobs"] is not None  # every text delta says which tokens it holds


def test_sampled_token_logprob_is_its_value_among_the_alternatives(srv):
    """One distribution for both numbers: with top_k 20 the drawn token is always among the
    20 most probable, listed with the same logprob (temperature does not change them)."""
    entries = {}
    for temperature in (0.5, 1.5):
        body = complete(srv.base_url, max_tokens=30, ignore_eos=True, seed=9, temperature=temperature, top_k=20,
                        logprobs=True, top_logprobs=20)
        entries[temperature] = body["choices"][0]["logprobs"]["content"]
        for entry in entries[temperature]:
            assert {k: entry[k] for k in ("token", "logprob", "bytes")} in entry["top_logprobs"]
    # both runs share the prompt, so their first step's distribution is one and the same
    assert entries[0.5][0]["top_logprobs"] == entries[1.5][0]["top_logprobs"]


def test_top_logprobs_zero_gives_empty_alternatives_and_logprobs_off_gives_null(srv):
    entries = complete(srv.base_url, max_tokens=8, temperature=0, logprobs=True, top_logprobs=0)["choices"][0]
    assert entries["logprobs"]["content"] and all(e["top_logprobs"] == [] for e in entries["logprobs"]["content"])
    assert complete(srv.base_url, max_tokens=8, temperature=0)["choices"][0]["logprobs"] is None
    chunks = streamed_chunks(srv.base_url, max_tokens=8, temperature=0, logprobs=False)
    assert all(choice["logprobs"] is None for chunk in chunks for choice in chunk["choices"])


def test_stop_string_ends_the_list_with_the_visible_text(srv):
    base = complete(srv.base_url, max_tokens=30, ignore_eos=True, seed=4, temperature=1.0)
    visible = base["choices"][0]["message"]["reasoning_content"]  # this seed stays in its think block
    stop = visible[8:11]
    assert len(stop) == 3
    body = complete(srv.base_url, max_tokens=30, ignore_eos=True, seed=4, temperature=1.0, stop=[stop],
                    logprobs=True)
    shown = body["choices"][0]["message"]["reasoning_content"]
    assert body["choices"][0]["finish_reason"] == "stop" and shown == visible[:visible.find(stop)]
    spelled = b"".join(bytes(e["bytes"]) for e in body["choices"][0]["logprobs"]["content"]).decode(errors="replace")
    assert spelled.startswith(shown) and len(spelled) < len(shown) + len(stop) + 8
    chunks = streamed_chunks(srv.base_url, max_tokens=30, ignore_eos=True, seed=4, temperature=1.0, stop=[stop],
                             logprobs=True)
    assert streamed_logprobs(chunks) == body["choices"][0]["logprobs"]["content"]


def test_logprobs_do_not_change_the_generated_text(srv):
    request = {"max_tokens": 30, "ignore_eos": True, "seed": 17, "temperature": 0.8, "presence_penalty": 0.5}
    plain = complete(srv.base_url, **request)["choices"][0]["message"]
    with_logprobs = complete(srv.base_url, logprobs=True, top_logprobs=2, **request)["choices"][0]["message"]
    assert plain == with_logprobs


def test_openai_sdk_reads_logprobs_streamed_and_not(srv):
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
    result = client.chat.completions.create(model="any", messages=HELLO, max_tokens=10, temperature=0, logprobs=True,
                                            top_logprobs=2)
    tokens = result.choices[0].logprobs.content
    assert tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    stream = client.chat.completions.create(model="any", messages=HELLO, max_tokens=10, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert streamed == tokens


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
])
def test_bad_top_logprobs_are_400(srv, extra, param):
    response = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": HELLO, **extra}, timeout=30)
    assert response.status_code == 400
    assert json.loads(response.text)["error"]["param"] == param
