"""Every refusal is an OpenAI-shaped error body with the right status, never a 500."""

import time

import httpx
import pytest

from helpers import HI, assert_error, break_decode_step, data_uri, health, post, stream_events, wait_ready


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, None),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "session_id": "bad id with spaces"}, "session_id"),
    ({"messages": HI, "logit_bias": {"1": 500}}, "logit_bias"),
    ({"messages": HI, "max_tokens": 10 ** 6}, "max_tokens"),
])
def test_invalid_requests_are_400_with_openai_error(base_url, body, param):
    error = assert_error(post(base_url, body), 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] is not None and error["param"].startswith(param)


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]),
])
def test_known_fields_we_cannot_honour_are_refused_by_name(base_url, field, value):
    assert_error(post(base_url, {"messages": HI, field: value}), 400, "unsupported_parameter", field)


def test_unknown_fields_are_ignored(base_url):
    response = post(base_url, {"messages": HI, "max_tokens": 2, "frobnicate": True, "user": "u1"})
    assert response.status_code == 200


def test_body_that_is_not_json_is_400(base_url):
    response = httpx.post(base_url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("url,code", [
    (data_uri(b"definitely not an image", "image/png"), "invalid_image"),
    ("data:image/png;base64,@@@not-base64@@@", "invalid_data_uri"),
    ("data:image/png,rawtext", "invalid_data_uri"),
    ("file:///etc/passwd", "invalid_media_url"),
    ("/etc/passwd", "invalid_media_url"),
    ("ftp://example.com/x.png", "invalid_media_url"),
])
def test_bad_images_are_400(base_url, url, code):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert_error(post(base_url, body), 400, code, "messages.0.content.0")


def test_undecodable_video_is_400(base_url):
    body = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_uri(b"\x00\x00\x00\x18ftypmp42garbage", "video/mp4")}}]}]}
    assert_error(post(base_url, body), 400, "invalid_video")


def test_prompt_longer_than_context_is_context_length_exceeded(base_url):
    body = {"messages": [{"role": "user", "content": "hello there " * 3000}]}
    assert_error(post(base_url, body), 400, "context_length_exceeded", "messages")


def test_failed_request_does_not_keep_its_session_id(base_url):
    bad = {"messages": [{"role": "user", "content": "hello there " * 3000}], "session_id": "reuse-after-400"}
    assert_error(post(base_url, bad), 400)
    ok = post(base_url, {"messages": HI, "max_tokens": 2, "session_id": "reuse-after-400"})
    assert ok.status_code == 200


def test_unknown_route_is_404_in_openai_shape(base_url):
    assert_error(httpx.get(base_url + "/v1/nothing-here"), 404)


def test_wrong_method_is_405_in_openai_shape(base_url):
    assert_error(httpx.get(base_url + "/v1/cancel/x"), 405)


def test_request_id_is_echoed(base_url):
    response = httpx.get(base_url + "/health", headers={"X-Request-Id": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"


def test_load_failure_gives_503_with_retry_after_and_health_error(make_server, tmp_path):
    srv = make_server(model_dir=tmp_path / "no-such-model", preload_model=False)
    response = post(srv.base_url, {"messages": HI})
    error = assert_error(response, 503, "model_load_failed")
    assert error["type"] == "server_error" and int(response.headers["retry-after"]) > 0
    body = health(srv.base_url)
    assert body["status"] == "error" and body["error"]


def test_requests_while_loading_get_503_model_loading(make_server):
    srv = make_server(preload_model=False, model_load_wait_seconds=0)
    response = post(srv.base_url, {"messages": HI, "max_tokens": 2})
    # the load can win the race on a fast machine; /health read after the answer says whether it had not yet
    if health(srv.base_url)["status"] != "ready":
        assert_error(response, 503, "model_loading")
        assert response.headers["retry-after"]
    wait_ready(srv.base_url)
    assert post(srv.base_url, {"messages": HI, "max_tokens": 2}).status_code == 200


def test_concurrent_first_requests_load_the_model_once(make_server):
    import concurrent.futures

    srv = make_server(preload_model=False)
    calls = []
    original = srv.state.models._from_pretrained  # no public route counts loads: observed from inside

    def counting():
        calls.append(time.monotonic())
        return original()

    srv.state.models._from_pretrained = counting
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: post(srv.base_url, {"messages": HI, "max_tokens": 2}).status_code,
                              range(4)))
    assert codes == [200] * 4 and len(calls) == 1


def test_failure_during_generation_becomes_error_event_then_done(make_server):
    """A crash inside a decode step is a fault the real model does not produce: injected."""
    srv = make_server()
    calls = break_decode_step(srv.state, at=4)
    _, status, events = stream_events(srv.base_url, {"messages": HI, "stream": True, "seed": 1, "max_tokens": 20})
    assert status == 200
    assert events[-1]["data"] == "[DONE]"
    assert '"generation_failed"' in events[-2]["data"]
    calls.clear()
    # ignore_eos: a sampled EOS at the first token would end the run before the 4th step fails
    response = post(srv.base_url, {"messages": HI, "max_tokens": 20, "ignore_eos": True})
    error = assert_error(response, 500, "generation_failed")
    assert "device fell off" not in error["message"]
    assert post(srv.base_url, {"messages": HI, "max_tokens": 2}).status_code == 200
