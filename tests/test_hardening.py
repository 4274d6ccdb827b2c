"""Bad input, hostile URLs and overload: each limit and refusal with its status and code."""

import base64
import concurrent.futures
import io
import json
import os
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import InProcessServer, ServerProcess, long_request, stream_events, wait_ready
from test_api import mp4_data_uri, png_data_uri
from test_errors import assert_error, post

TEXT = [{"role": "user", "content": "hi"}]


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]


def video_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]


def png_bytes(size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def strict(tiny_model_dir):
    """A server with small limits so each one is cheap to hit."""
    with InProcessServer(tiny_model_dir, preload_model=True, max_request_bytes=200_000, max_image_pixels=100 * 100,
                         max_images_per_request=2, max_videos_per_request=1, max_video_bytes=60_000,
                         max_video_seconds=1.0, private_media_networks="127.0.0.2/32") as srv:
        wait_ready(srv.base_url)
        yield srv


# ----------------------------------------------------------------------------- body size

def test_body_over_limit_by_content_length_is_413(strict):
    response = post(strict.base_url, {"messages": [{"role": "user", "content": "x" * 300_000}]})
    assert_error(response, 413, "request_too_large")


def test_body_over_limit_when_streamed_without_length_is_413(strict):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    response = httpx.post(strict.base_url + "/v1/chat/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")


def test_body_under_limit_passes_through(strict):
    assert post(strict.base_url, {"messages": TEXT, "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------- images and video

def test_image_over_pixel_limit_is_413_before_decoding(strict):
    response = post(strict.base_url, {"messages": image_message(png_data_uri(size=(200, 200)))})
    assert_error(response, 413, "image_too_large", "messages.0.content.0")


def test_image_in_unsupported_format_is_400(strict):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    url = "data:image/tiff;base64," + base64.b64encode(buf.getvalue()).decode()
    assert_error(post(strict.base_url, {"messages": image_message(url)}), 400, "invalid_image")


def test_too_many_images_is_400(strict):
    """Issue #15: too many images was a 413 where clients expect 400; the code stays too_many_images."""
    part = {"type": "image_url", "image_url": {"url": png_data_uri(size=(32, 32))}}
    body = {"messages": [{"role": "user", "content": [part, part, part]}]}
    assert_error(post(strict.base_url, body), 400, "too_many_images")


def test_too_many_videos_is_400(strict):
    """Issue #15: like images, too many videos is a 400 with code too_many_videos."""
    part = {"type": "video_url", "video_url": {"url": mp4_data_uri(frames=4)}}
    body = {"messages": [{"role": "user", "content": [part, part]}]}
    assert_error(post(strict.base_url, body), 400, "too_many_videos")


def test_video_longer_than_limit_is_413(strict):
    # 12 frames at 8 fps is 1.5 s, over the 1 s limit
    assert_error(post(strict.base_url, {"messages": video_message(mp4_data_uri(frames=12))}), 413, "video_too_large")


def test_video_over_byte_limit_is_413(strict):
    big = "data:video/mp4;base64," + base64.b64encode(os.urandom(90_000)).decode()
    assert_error(post(strict.base_url, {"messages": video_message(big)}), 413, "media_too_large")


def test_short_video_within_limits_is_served_and_leaves_no_temp_files(strict, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    response = post(strict.base_url, {"messages": video_message(mp4_data_uri(frames=6)), "max_tokens": 2})
    assert response.status_code == 200
    assert_error(post(strict.base_url, {"messages": video_message(mp4_data_uri(frames=12))}), 413)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- SSRF

class MediaHandler(BaseHTTPRequestHandler):
    redirect_to = ""

    def do_GET(self):
        if self.path == "/img.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
        elif self.path == "/endless":  # no Content-Length: only the streamed count can stop it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(400):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def serve(host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), MediaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def media_hosts():
    """An allowed media host on 127.0.0.2 (exempted by PRIVATE_MEDIA_NETWORKS), a forbidden one on 127.0.0.1."""
    allowed, forbidden = serve("127.0.0.2"), serve("127.0.0.1")
    MediaHandler.redirect_to = f"http://127.0.0.1:{forbidden.server_address[1]}/img.png"
    yield f"http://127.0.0.2:{allowed.server_address[1]}", f"http://127.0.0.1:{forbidden.server_address[1]}"
    allowed.shutdown()
    forbidden.shutdown()


def test_image_from_an_allowed_host_is_fetched(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": image_message(allowed + "/img.png"), "max_tokens": 2})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img.png", "http://[::1]:{port}/img.png", "http://169.254.169.254/latest/meta-data/",
    "http://localhost:{port}/img.png", "http://0x7f.1:{port}/img.png", "http://2130706433:{port}/img.png",
    "http://[::ffff:127.0.0.1]:{port}/img.png", "http://10.1.2.3/x.png", "http://224.0.0.1/x.png",
])
def test_private_loopback_link_local_and_multicast_urls_are_refused(strict, media_hosts, url):
    port = media_hosts[1].rsplit(":", 1)[1]
    response = post(strict.base_url, {"messages": image_message(url.format(port=port))})
    assert_error(response, 400, "media_url_forbidden")


def test_redirect_from_allowed_host_to_loopback_is_refused(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": image_message(allowed + "/redirect")})
    assert_error(response, 400, "media_url_forbidden")


def test_streamed_download_over_cap_is_413(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": video_message(allowed + "/endless")})
    assert_error(response, 413, "media_too_large")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "gopher://127.0.0.1/x"])
def test_file_urls_and_paths_are_refused_by_default(strict, url):
    assert_error(post(strict.base_url, {"messages": image_message(url)}), 400, "invalid_media_url")


def test_allowed_domains_list_refuses_other_hosts(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, allowed_media_domains="images.example.com") as srv:
        wait_ready(srv.base_url)
        response = post(srv.base_url, {"messages": image_message("http://evil.example.org/x.png")})
        assert_error(response, 400, "media_url_forbidden")


def test_local_media_path_serves_files_under_it_only(tiny_model_dir, tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    with InProcessServer(tiny_model_dir, preload_model=True, allowed_local_media_path=str(tmp_path)) as srv:
        wait_ready(srv.base_url)
        ok = post(srv.base_url, {"messages": image_message(str(tmp_path / "ok.png")), "max_tokens": 2})
        assert ok.status_code == 200
        ok = post(srv.base_url, {"messages": image_message(f"file://{tmp_path}/ok.png"), "max_tokens": 2})
        assert ok.status_code == 200
        escape = post(srv.base_url, {"messages": image_message(f"{tmp_path}/../../etc/passwd")})
        assert_error(escape, 400, "invalid_media_url")


# ----------------------------------------------------------------------------- auth and CORS

@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, api_key="key-one,key-two",
                         cors_allow_origins="https://app.example") as srv:
        wait_ready(srv.base_url)
        yield srv


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/chat/completions/some-session"),
    ("POST", "/v1/cancel/some-session"),
])
def test_every_v1_route_requires_the_api_key(keyed, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        response = httpx.request(method, keyed.base_url + path, json={"messages": TEXT}, headers=headers)
        assert_error(response, 401, "invalid_api_key")


def test_any_configured_key_is_accepted_and_health_stays_open(keyed):
    for key in ("key-one", "key-two"):
        response = httpx.get(keyed.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert httpx.get(keyed.base_url + "/health").status_code == 200


def test_resume_needs_the_key_too(keyed):
    auth = {"Authorization": "Bearer key-one"}
    stream_events(keyed.base_url, {"messages": TEXT, "max_tokens": 3, "stream": True, "session_id": "keyed-1"},
                  headers=auth)
    response = httpx.post(keyed.base_url + "/v1/chat/completions", json={"messages": TEXT},
                          headers={"Last-Event-ID": "keyed-1:0"})
    assert_error(response, 401, "invalid_api_key")
    _, status, events = stream_events(keyed.base_url, {"messages": TEXT}, headers={**auth, "Last-Event-ID": "keyed-1:0"})
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


# ----------------------------------------------------------------------------- overload and timeouts

def test_streams_beyond_running_plus_queue_get_429_and_admitted_ones_complete(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, max_queue=1, max_batch_size=1) as srv:
        wait_ready(srv.base_url)
        bodies = [long_request(max_tokens=500, session_id=f"load-{i}") for i in range(5)]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda b: stream_events(srv.base_url, b), bodies))
        statuses = [status for _, status, _ in results]
        assert statuses.count(200) == 2 and statuses.count(429) == 3, statuses
        for headers, status, events in results:
            if status == 429:
                assert events[0]["error"]["code"] == "queue_full" and int(headers["retry-after"]) > 0
            else:
                assert json.loads(events[-2]["data"])["choices"][0]["finish_reason"] == "length"
        assert srv.state.worker.admitted == 0
        assert post(srv.base_url, {"messages": TEXT, "max_tokens": 2}).status_code == 200


def test_generation_timeout_ends_a_runaway_stream_with_a_clear_finish(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, generation_timeout_seconds=0.3) as srv:
        wait_ready(srv.base_url)
        _, _, events = stream_events(srv.base_url, long_request(max_tokens=3000, session_id="runaway"))
        final = json.loads(events[-2]["data"])["choices"][0]
        assert final["finish_reason"] == "timeout" and events[-1]["data"] == "[DONE]"
        body = httpx.get(srv.base_url + "/v1/chat/completions/runaway").json()
        assert 0 < body["usage"]["completion_tokens"] < 3000


def test_context_overflow_truncate_drops_oldest_turns_and_says_so(tiny_model_dir):
    long_turn = "hello there " * 1000
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_turn},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": long_turn},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "And now?"}]
    with InProcessServer(tiny_model_dir, preload_model=True, context_overflow="truncate") as srv:
        wait_ready(srv.base_url)
        body = post(srv.base_url, {"messages": messages, "max_tokens": 2}).json()
        assert body["truncated_messages"] >= 1 and body["usage"]["prompt_tokens"] < 4096
        _, _, events = stream_events(srv.base_url, {"messages": messages, "max_tokens": 2, "stream": True})
        assert json.loads(events[0]["data"])["truncated_messages"] == body["truncated_messages"]
        alone = post(srv.base_url, {"messages": [{"role": "user", "content": long_turn * 3}]})
        assert_error(alone, 400, "context_length_exceeded")


# ----------------------------------------------------------------------------- logs and shutdown

def test_logs_carry_request_ids_and_never_bodies_keys_or_media(tiny_model_dir, tmp_path):
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", API_KEY="sekrit-key-123").start()
    try:
        secret_text = "my-private-question-42"
        image = png_data_uri(size=(40, 40))
        auth = {"Authorization": "Bearer sekrit-key-123", "X-Request-Id": "req-abc"}
        post(srv.base_url, {"messages": image_message(image) + [{"role": "user", "content": secret_text}],
                            "max_tokens": 3}, headers=auth)
        stream_events(srv.base_url, {"messages": TEXT, "max_tokens": 3, "stream": True, "session_id": "logged"},
                      headers=auth)
        httpx.post(srv.base_url + "/v1/cancel/logged", headers=auth)
    finally:
        srv.stop()
    log = srv.log_text()
    assert "[req-abc]" in log and "session logged start" in log
    for leaked in (secret_text, "sekrit-key-123", image[30:60], "Bearer"):
        assert leaked not in log


def test_sigterm_finishes_streams_with_a_final_event_and_flushes_sqlite(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    env = dict(PERSIST_SESSIONS="1", SESSIONS_DB_PATH=str(db))
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", **env).start()
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(
        events=stream_events(srv.base_url, long_request(max_tokens=3000, session_id="at-shutdown"))[2]))
    reader.start()
    deadline = time.monotonic() + 10
    while "session at-shutdown start" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    srv.stop(signal.SIGTERM)
    reader.join(timeout=30)
    events = seen["events"]
    assert events[-1]["data"] == "[DONE]"
    assert json.loads(events[-2]["data"])["choices"][0]["finish_reason"] == "cancelled"
    again = ServerProcess(tiny_model_dir, tmp_path / "server2.log", **env).start()
    try:
        _, _, replay = stream_events(again.base_url, method="GET", path="/v1/chat/completions/at-shutdown",
                                     params={"stream": "true"})
        assert replay == events
        assert httpx.get(again.base_url + "/v1/chat/completions/at-shutdown").json()["status"] == "cancelled"
    finally:
        again.stop()
