"""The chat page's server side (issue #13): `/` and `/static/`, WEB_UI=0, and the per-session
read token that lets EventSource clients resume without putting the API key in a URL."""

import logging
import re

import httpx
import pytest

import main
from helpers import ROOT, InProcessServer, stream_events, wait_ready

KEYS = ("web-key-one-0123456789", "web-key-two-9876543210")
TEXT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, api_key=",".join(KEYS)) as srv:
        wait_ready(srv.base_url)
        yield srv


@pytest.fixture(scope="module")
def api_only(tiny_model_dir):
    """No API key, no page (WEB_UI=0)."""
    with InProcessServer(tiny_model_dir, web_ui=False) as srv:
        yield srv


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def streamed_session(base_url: str, key: str, session_id: str) -> tuple[str, list[dict]]:
    """(read token, events) of a short streamed answer created with `key`."""
    headers, status, events = stream_events(base_url, {"messages": TEXT, "max_tokens": 6, "ignore_eos": True,
                                                       "stream": True, "session_id": session_id}, headers=auth(key))
    assert status == 200 and events[-1]["data"] == "[DONE]"
    return headers["x-read-token"], events


# ----------------------------------------------------------------------------- the page

def test_page_and_its_files_are_open_without_a_key_and_carry_a_strict_csp(keyed):
    page = httpx.get(keyed.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert {"/static/app.js", "/static/app.css", "/static/icon.svg"} <= set(assets)
    for asset in assets + ["/static/markdown.js", "/static/stream.js"]:
        assert httpx.get(keyed.base_url + asset).status_code == 200, asset
    assert httpx.head(keyed.base_url + "/").status_code == 200


def test_page_files_name_no_other_origin():
    """No CDN, no web font, no analytics: the only absolute URLs are the SVG namespace and
    the markdown renderer's own http(s) patterns."""
    for path in (ROOT / "static").iterdir():
        text = path.read_text()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text), path.name
        assert not re.search(r"""\bimport\b[^;]*["']https?://""", text), path.name


def test_page_code_never_turns_text_into_html():
    """Model output reaches the page as text nodes only (the markdown renderer builds DOM)."""
    for path in (ROOT / "static").glob("*.js"):
        assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(",
                             path.read_text()), path.name


def test_web_ui_off_serves_no_page(api_only):
    for path in ("/", "/static/app.js"):
        response = httpx.get(api_only.base_url + path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(api_only.base_url + "/health").status_code == 200


# ----------------------------------------------------------------------------- read tokens

def test_read_token_opens_the_result_and_its_stream_without_the_key(keyed):
    token, events = streamed_session(keyed.base_url, KEYS[0], "rt-open")
    url = keyed.base_url + "/v1/chat/completions/rt-open"
    result = httpx.get(url, params={"read_token": token})
    assert result.status_code == 200 and result.json()["status"] == "completed"
    _, status, replayed = stream_events(keyed.base_url, method="GET", path="/v1/chat/completions/rt-open",
                                        params={"stream": "true", "read_token": token, "last_event_id": "rt-open:1"})
    assert status == 200 and [e["id"] for e in replayed] == [e["id"] for e in events[2:]]


def test_read_token_is_made_with_the_key_that_created_the_session(keyed):
    one, _ = streamed_session(keyed.base_url, KEYS[0], "rt-key-1")
    two, _ = streamed_session(keyed.base_url, KEYS[1], "rt-key-2")
    assert one != two
    assert one == main.read_token(KEYS[0].encode(), "rt-key-1")
    assert httpx.get(keyed.base_url + "/v1/chat/completions/rt-key-2", params={"read_token": two}).status_code == 200


def test_read_token_opens_nothing_else(keyed):
    """Read-only and one session: not another session, not cancel, not a POST, not a
    resume by POST, not the models list; a forged token is a 401 like a bad key."""
    token, _ = streamed_session(keyed.base_url, KEYS[0], "rt-narrow")
    streamed_session(keyed.base_url, KEYS[0], "rt-other")
    q = {"read_token": token}
    base = keyed.base_url
    refused = [
        httpx.get(base + "/v1/chat/completions/rt-other", params=q),
        httpx.get(base + "/v1/chat/completions/rt-narrow", params={"read_token": token[:-1] + "0"}),
        httpx.post(base + "/v1/cancel/rt-narrow", params=q),
        httpx.post(base + "/v1/chat/completions", params=q, json={"messages": TEXT}),
        httpx.post(base + "/v1/chat/completions", params=q, json={"messages": TEXT},
                   headers={"Last-Event-ID": "rt-narrow:0"}),
        httpx.get(base + "/v1/models", params=q),
    ]
    for response in refused:
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_no_read_token_without_api_keys(api_only):
    headers, status, _ = stream_events(api_only.base_url, {"messages": TEXT, "max_tokens": 2, "stream": True})
    assert status == 200 and "x-read-token" not in headers


def test_access_log_masks_read_tokens():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/v1/chat/completions/s1?read_token=abc123&stream=true",
                                "1.1", 200), None)
    assert main.ReadTokenRedactor().filter(record)
    assert "abc123" not in record.getMessage()
    assert '"GET /v1/chat/completions/s1?read_token=***&stream=true HTTP/1.1" 200' in record.getMessage()
