"""API keys and CORS: with API_KEY set, every /v1 route (resume included) needs one of the
configured keys as a Bearer token, /health stays open; CORS preflights are answered for
configured origins only."""

import httpx
import pytest

from helpers import HI, assert_error, stream_events


@pytest.fixture(scope="module")
def keyed(make_module_server):
    return make_module_server(api_key="key-one,key-two", cors_allow_origins="https://app.example")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/chat/completions/some-session"),
    ("POST", "/v1/cancel/some-session"),
])
def test_every_v1_route_requires_the_api_key(keyed, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        response = httpx.request(method, keyed.base_url + path, json={"messages": HI}, headers=headers)
        assert_error(response, 401, "invalid_api_key")


def test_any_configured_key_is_accepted_and_health_stays_open(keyed):
    for key in ("key-one", "key-two"):
        response = httpx.get(keyed.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert httpx.get(keyed.base_url + "/health").status_code == 200


def test_resume_needs_the_key_too(keyed):
    auth = {"Authorization": "Bearer key-one"}
    stream_events(keyed.base_url, {"messages": HI, "max_tokens": 3, "stream": True, "session_id": "keyed-1"},
                  headers=auth)
    response = httpx.post(keyed.base_url + "/v1/chat/completions", json={"messages": HI},
                          headers={"Last-Event-ID": "keyed-1:0"})
    assert_error(response, 401, "invalid_api_key")
    _, status, events = stream_events(keyed.base_url, {"messages": HI}, headers={**auth, "Last-Event-ID": "keyed-1:0"})
    assert status == 200 and events[-1]["data"] == "[DONE]"


def test_cors_preflight_is_answered_only_for_configured_origins(keyed, base_url):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,last-event-id"}
    response = httpx.options(keyed.base_url + "/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(keyed.base_url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.options(base_url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in default.headers
