"""Request and response fields the OpenAI spec and SDK rely on (issue #15): nulls, top_p 0, seed, refusal."""

import httpx
import openai
import pytest
import torch
from openai.types.chat import ChatCompletion

import main
from helpers import InProcessServer, stream_events, wait_ready

TEXT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True) as server:
        wait_ready(server.base_url)
        yield server


def post(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json={"messages": TEXT, **body}, timeout=60)


NULLABLE = ["n", "presence_penalty", "frequency_penalty", "stream", "logprobs", "top_logprobs", "seed", "stop",
            "temperature", "top_p", "max_tokens", "stream_options", "logit_bias"]


def test_null_fields_mean_their_defaults(srv):
    """The SDK sends null for a None argument; each such field behaves as if it was left out."""
    plain = post(srv.base_url, {"max_tokens": 6, "temperature": 0}).json()
    nulls = post(srv.base_url, {"max_tokens": 6, "temperature": 0, **{k: None for k in NULLABLE
                                                                     if k not in ("max_tokens", "temperature")}})
    assert nulls.status_code == 200, nulls.text
    body = nulls.json()
    assert body["choices"] == plain["choices"] and len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None


def test_openai_sdk_passing_none_everywhere_works(srv):
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
    result = client.chat.completions.create(model="any", messages=TEXT, max_tokens=4, n=None, presence_penalty=None,
                                            frequency_penalty=None, stream=None, logprobs=None, top_logprobs=None)
    assert len(result.choices) == 1


def test_non_streamed_message_has_refusal_null(srv):
    body = post(srv.base_url, {"max_tokens": 3}).json()
    assert "refusal" in body["choices"][0]["message"] and body["choices"][0]["message"]["refusal"] is None
    ChatCompletion.model_validate(body)


def test_top_p_zero_keeps_only_the_most_probable_token(srv):
    """top_p 0 is allowed by the spec: at any temperature and seed it decodes like greedy."""
    greedy = post(srv.base_url, {"max_tokens": 30, "ignore_eos": True, "temperature": 0}).json()["choices"]
    for seed in (1, 2):
        body = {"max_tokens": 30, "ignore_eos": True, "temperature": 1.5, "top_p": 0, "top_k": 0, "seed": seed}
        response = post(srv.base_url, body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"] == greedy[0]["message"]
    _, status, events = stream_events(srv.base_url, {"messages": TEXT, "top_p": 0, "max_tokens": 3, "stream": True})
    assert status == 200 and events[-1]["data"] == "[DONE]"


def test_sample_tokens_with_top_p_zero_never_zeroes_every_probability():
    params = main.SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.0, top_k=0, seed=None, stop=[],
                                 min_tokens=0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={})
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for _ in range(20):
        assert main.sample_tokens(scores, params, generators) == [1, 0]


def test_seed_outside_int64_is_400(srv):
    response = post(srv.base_url, {"seed": 2 ** 64, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
