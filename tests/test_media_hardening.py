"""Issue #15, media and prompt work: each hole an outside fuzz/fault campaign found, pinned
through a real server on the tiny checkpoint (one regression test per bug)."""

import base64
import io
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from helpers import InProcessServer, wait_ready


# ----------------------------------------------------------------------------- helpers

def post(base_url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120, **kw)


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param
    return error


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_bytes(size=(64, 64), fmt="PNG", color=(10, 200, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def video_bytes(width: int = 64, height: int = 64, frames: int = 8, fmt: str = "mp4", codec: str = "mpeg4",
                rate: int = 8, gop: int | None = None) -> bytes:
    """A small clip written with PyAV (its bundled FFmpeg has mpeg4 and mpeg2video)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            image = np.full((height, width, 3), i * 20 % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def image_body(url: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 2, **extra}


def video_body(url: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}],
            "max_tokens": 2, **extra}


@pytest.fixture(scope="module")
def media_server(tiny_model_dir):
    """Default limits, except an exempt media host on 127.0.0.2 for the fetch tests."""
    with InProcessServer(tiny_model_dir, preload_model=True, private_media_networks="127.0.0.2/32") as srv:
        wait_ready(srv.base_url)
        yield srv


# ----------------------------------------------------------------------------- SSRF

class MediaHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = image_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback_media():
    """A media server on 127.0.0.1, which every test here must fail to reach."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("host", ["[2002:7f00:1::1]", "[2002:a9fe:a9fe::1]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
                                  "[64:ff9b::7f00:1]", "[64:ff9b:1::808:808]", "[fec0::1]", "192.88.99.1",
                                  "[::127.0.0.1]"])
def test_ipv6_addresses_embedding_private_ipv4_are_refused(media_server, loopback_media, host):
    """Issue #15: 6to4 (2002::/16) addresses passed the private-address check although they
    embed 127.0.0.1 or 169.254.169.254, and so did site-local fec0::/10 and the 6to4 relay
    192.88.99.0/24. Verified: every address that embeds or relays to a private IPv4 host
    (6to4, Teredo, NAT64 and local-use NAT64, IPv4-compatible) is a 400 media_url_forbidden."""
    response = post(media_server.base_url, image_body(f"http://{host}:{loopback_media}/img.png"))
    assert_error(response, 400, "media_url_forbidden")


@pytest.mark.parametrize("url", ["http://example.com:99999/x.png", "http://example.com:abc/x.png",
                                 "http://[::1/x.png", "http://]/x.png", "http://example.com\uff0f@127.0.0.1/",
                                 "http://example.com:-1/x.png", "http://a..b/x.png", "http://" + "a" * 64 + ".com/"])
def test_malformed_media_urls_are_400(media_server, url):
    """Issue #15: a port out of range or not a number, an unbalanced '[', a netloc that NFKC
    normalization changes (a fullwidth solidus before '@') raised ValueError in urlsplit,
    a 500. Verified: each is a 400 invalid_media_url, refused before any DNS lookup."""
    assert_error(post(media_server.base_url, image_body(url)), 400, "invalid_media_url", "messages.0.content.0")


def test_fuzzed_media_urls_never_get_a_server_error(tiny_model_dir):
    """Issue #15, the property behind the case above: whatever netloc, port, user info or
    path a media URL has, the answer is a 4xx, never a 5xx. Hosts end in .invalid, which
    never resolves, so no case reaches the network."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
    host = st.one_of(st.just("media.invalid"), text.map(lambda t: t + ".media.invalid"), st.just("[::1"),
                     st.just("[v1.x]"), st.just("[::1]]"), st.just("127.0.0.1"), st.just("\uff4d\uff45.media.invalid"))
    port = st.one_of(st.just(""), st.integers(-5, 200_000).map(lambda p: f":{p}"), text.map(lambda t: ":" + t))
    user = st.one_of(st.just(""), text.map(lambda t: t + "@"))
    url = st.builds(lambda u, h, p, path: f"http://{u}{h}{p}/{path}", user, host, port, text)

    with InProcessServer(tiny_model_dir, preload_model=True, allowed_media_domains="media.invalid",
                         media_fetch_timeout_seconds=1.0) as srv:
        wait_ready(srv.base_url)

        @given(url=url)
        @settings(max_examples=100, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(url):
            response = post(srv.base_url, image_body(url))
            assert 400 <= response.status_code < 500, (url, response.text)

        check()


class DripHandler(BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends one every 0.1 s: never idle long enough for a read timeout."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_dripping_media_server_is_cut_off_at_the_fetch_deadline(tiny_model_dir):
    """Issue #15: a server that drips bytes kept a fetch alive 24.6 s past a 2 s timeout,
    because timeouts applied per read. Verified: with MEDIA_FETCH_DEADLINE_SECONDS=1 the
    request ends with 400 media_fetch_timeout within a few seconds (the drip lasts 100 s)."""
    drip = ThreadingHTTPServer(("127.0.0.2", 0), DripHandler)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    try:
        with InProcessServer(tiny_model_dir, preload_model=True, private_media_networks="127.0.0.2/32",
                             media_fetch_timeout_seconds=2.0, media_fetch_deadline_seconds=1.0) as srv:
            wait_ready(srv.base_url)
            started = time.monotonic()
            response = post(srv.base_url, image_body(f"http://127.0.0.2:{drip.server_address[1]}/slow.png"))
            assert_error(response, 400, "media_fetch_timeout")
            assert time.monotonic() - started < 6
    finally:
        drip.shutdown()


# ----------------------------------------------------------------------------- video containers

SDP = b"""v=0
o=- 0 0 IN IP4 127.0.0.1
s=fuzz
c=IN IP4 0.0.0.0
t=0 0
m=video 45678 RTP/AVP 96
a=rtpmap:96 H264/90000
m=audio 45680 RTP/AVP 97
a=rtpmap:97 opus/48000/2
"""
HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/seg.ts\n#EXT-X-ENDLIST\n"
CONCAT = b"ffconcat version 1.0\nfile 'file:///etc/passwd'\n"


def udp_sockets_of_this_process() -> set[str]:
    """Inodes of the UDP sockets this process holds (the in-process server is this process)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    udp = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with open(table) as f:
            udp |= {line.split()[9] for line in list(f)[1:]}
    return inodes & udp


@pytest.mark.parametrize("payload", [SDP, HLS, CONCAT], ids=["sdp", "hls", "concat"])
def test_video_containers_that_name_urls_are_refused_without_opening_sockets(media_server, payload):
    """Issue #15: a few hundred bytes of SDP sent as a data: video made FFmpeg probe it as
    SDP, bind UDP ports on 0.0.0.0 and wait 19 s for RTP. Playlists (HLS, concat) can name
    http:// and file:// inputs the same way. Verified: each is a 400 invalid_video within
    2 s, and the server process held no UDP socket at any time while it answered."""
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(udp_sockets_of_this_process())
            time.sleep(0.002)

    before = udp_sockets_of_this_process()
    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        response = post(media_server.base_url, video_body(data_uri(payload, "video/mp4")))
    finally:
        done.set()
        watcher.join()
    assert_error(response, 400, "invalid_video", "messages.0.content.0")
    assert seen - before == set()
    assert time.monotonic() - started < 2


# ----------------------------------------------------------------------------- decoding errors

@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (10, 2010)])
def test_images_of_extreme_aspect_ratio_are_400(media_server, size):
    """Issue #15: a 1x20000 or 20000x1 image passed every check, then Qwen's smart_resize
    raised ValueError (aspect ratio over 200) inside the processor: a 500. Verified: the
    shape is refused from the header with 400 invalid_image."""
    response = post(media_server.base_url, image_body(data_uri(image_bytes(size), "image/png")))
    assert_error(response, 400, "invalid_image", "messages.0.content.0")


def test_videos_of_extreme_aspect_ratio_are_400(media_server):
    """Issue #15: a 16x3400 video reached the video processor, whose smart_resize raised: a
    500. Verified: 400 invalid_video, decided from the stream's dimensions."""
    response = post(media_server.base_url, video_body(data_uri(video_bytes(16, 3400, frames=2), "video/mp4")))
    assert_error(response, 400, "invalid_video", "messages.0.content.0")


def test_video_whose_resolution_changes_mid_stream_is_400(media_server):
    """Issue #15: sampled frames of two sizes made np.stack raise: a 500. Two MPEG-TS
    segments of 64x64 and 128x96, joined byte to byte, are one legal stream whose
    resolution changes. Verified: 400 invalid_video naming the change."""
    first = video_bytes(64, 64, frames=8, fmt="mpegts", codec="mpeg2video")
    second = video_bytes(128, 96, frames=8, fmt="mpegts", codec="mpeg2video")
    response = post(media_server.base_url, video_body(data_uri(first + second, "video/mp2t")))
    error = assert_error(response, 400, "invalid_video", "messages.0.content.0")
    assert "resolution" in error["message"]


def test_mp4_whose_video_stream_has_no_codec_is_400(media_server):
    """Issue #15: mutated MP4s raised AttributeError in decoding (a 500). One byte is
    enough: a broken 'dinf' box size leaves the video stream without a codec, and
    stream.codec_context is None. Verified: 400 invalid_video."""
    data = bytearray(video_bytes())
    data[data.index(b"dinf") - 1] = 0x0B
    response = post(media_server.base_url, video_body(data_uri(bytes(data), "video/mp4")))
    assert_error(response, 400, "invalid_video", "messages.0.content.0")


# ----------------------------------------------------------------------------- decode work

class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_video_decodes_only_the_frames_it_samples(tiny_model_dir):
    """Issue #15: every frame up to the last sampled one was decoded (~7.3 ms a 1080p frame,
    so a 36,000-frame video held a worker ~4 minutes to keep 16). Verified on a 600-frame
    MP4 with a keyframe every 10 frames: 16 frames are kept, and the server decodes at
    most one GOP per kept frame (it seeks to the keyframe before each) instead of ~600."""
    records = Records()
    with InProcessServer(tiny_model_dir, preload_model=True, log_level="debug", max_video_seconds=600) as srv:
        wait_ready(srv.base_url)
        logging.getLogger("qwen3vl_server").addHandler(records)
        try:
            clip = video_bytes(32, 32, frames=600, rate=25, gop=10)
            response = post(srv.base_url, video_body(data_uri(clip, "video/mp4")))
        finally:
            logging.getLogger("qwen3vl_server").removeHandler(records)
    assert response.status_code == 200, response.text
    [line] = [m for m in records.messages if m.startswith("video: kept")]
    kept, total, decoded = (int(n) for n in re.findall(r"\d+", line))
    assert (kept, total) == (16, 600)
    assert decoded <= 16 * 10, line


def test_slow_video_decoding_stops_at_the_decode_deadline(tiny_model_dir, monkeypatch):
    """Issue #15: nothing bounded the time one request's media could take to decode.
    Each kept frame is made to cost 0.3 s here (a fault injected into the in-process
    server). Verified: with MEDIA_DECODE_TIMEOUT_SECONDS=1 the request gets 413
    media_decode_timeout after a few frames instead of decoding all 16 (~5 s)."""
    import main

    kept, real = [], main.check_stackable

    def slow_frame(*args):
        kept.append(1)
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(main, "check_stackable", slow_frame)
    with InProcessServer(tiny_model_dir, preload_model=True, media_decode_timeout_seconds=1.0) as srv:
        wait_ready(srv.base_url)
        started = time.monotonic()
        response = post(srv.base_url, video_body(data_uri(video_bytes(frames=32), "video/mp4")))
        assert_error(response, 413, "media_decode_timeout", "messages.0.content.0")
        assert time.monotonic() - started < 4
        assert len(kept) < 8


def test_cancel_while_media_decodes_stops_before_the_next_media(media_server, monkeypatch):
    """Issue #15: a request cancelled while its media decoded (its session's cancel flag
    set) went on decoding every frame and only then was refused. The first image's decode
    is held here until the session is cancelled. Verified: the request ends with 409
    cancelled, and the video after that image is never decoded."""
    import main

    entered, release, videos = threading.Event(), threading.Event(), []
    real_image, real_video = main.decode_image, main.decode_video

    def held_image(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real_image(*args, **kwargs)

    monkeypatch.setattr(main, "decode_image", held_image)
    monkeypatch.setattr(main, "decode_video", lambda *args: videos.append(1) or real_video(*args))
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(), "image/png")}},
        {"type": "video_url", "video_url": {"url": data_uri(video_bytes(), "video/mp4")}}]}],
        "max_tokens": 2, "session_id": "cancelled-while-decoding"}
    result = {}
    sender = threading.Thread(target=lambda: result.update(response=post(media_server.base_url, body)))
    sender.start()
    assert entered.wait(30)
    media_server.state.sessions.sessions["cancelled-while-decoding"].cancel("manual")  # what /v1/cancel calls
    release.set()
    sender.join(30)
    assert_error(result["response"], 409, "cancelled", "messages.0.content.1")
    assert videos == []


def test_text_requests_do_not_queue_behind_media_decoding(media_server, monkeypatch):
    """Issue #15: media decoding and tokenizing shared one 2-thread pool, so two slow videos
    made every text-only request wait behind them. Three image requests are held inside
    decoding here (more than the media pool's threads). Verified: a text-only request is
    answered meanwhile, and the held requests complete once released."""
    import main

    release, entered = threading.Event(), threading.Semaphore(0)
    real = main.decode_image

    def held(*args, **kwargs):
        entered.release()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(main, "decode_image", held)
    body = image_body(data_uri(image_bytes(), "image/png"))
    results = []
    senders = [threading.Thread(target=lambda: results.append(post(media_server.base_url, body))) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # both media threads are busy
        text = httpx.post(media_server.base_url + "/v1/chat/completions", timeout=15,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert text.status_code == 200, text.text
    finally:
        release.set()
        for sender in senders:
            sender.join(60)
    assert [r.status_code for r in results] == [200, 200, 200]


def test_data_uri_base64_is_decoded_in_the_media_pool_not_on_the_event_loop(media_server, monkeypatch):
    """#14: a data URI's base64 was decoded on the event loop (1-2 ms for a 270 KB image,
    time no other request could use) before the media pool decoded the image. Verified: the
    payload is decoded on a media-pool thread, and the image is still understood."""
    import main

    threads, real = [], main.decode_base64
    monkeypatch.setattr(main, "decode_base64", lambda *args: threads.append(threading.current_thread().name)
                        or real(*args))
    response = post(media_server.base_url, image_body(data_uri(image_bytes(), "image/png")))
    assert response.status_code == 200, response.text
    assert len(threads) == 1 and threads[0].startswith("media")


@pytest.mark.parametrize("payload", ["", "QUJD", "QUI=", "QQ==", "QUJD=", "QUJDRA==", "QUJDRA=", "QUJDRA", "QU JD",
                                     "QUJD\n", "QU=D", "=QUJ", "QUJD====", "QUJ-", "QUJ_", "QUJé", "QUJD\x00", "===="])
def test_data_uri_base64_accepts_exactly_what_b64decode_validate_accepts(payload):
    """D75: the SIMD decoder (pybase64) refuses superfluous padding that binascii accepts
    (`QUJD=`). Verified on edge cases: the server decodes exactly what
    base64.b64decode(validate=True) decodes, to the same bytes, and refuses the rest."""
    import binascii

    import main

    try:
        expected = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        expected = None
    try:
        got = main.strict_b64decode(payload)
    except (binascii.Error, ValueError):
        got = None
    assert got == expected


def test_data_uri_over_the_byte_limit_is_413_before_its_base64_is_checked(tiny_model_dir):
    """#14: the size a data URI decodes to is read from its length, so one over MAX_IMAGE_BYTES
    is refused (413) without decoding it, even when its base64 is broken further in (it was a
    400 after a full decode before). At the limit exactly it is accepted."""
    payload = image_bytes((32, 32))
    with InProcessServer(tiny_model_dir, preload_model=True, max_image_bytes=len(payload)) as srv:
        wait_ready(srv.base_url)
        exact = post(srv.base_url, image_body(data_uri(payload, "image/png")))
        assert exact.status_code == 200, exact.text
        broken = data_uri(payload + b"x", "image/png")[:-8] + "@@@@@@@@"
        assert_error(post(srv.base_url, image_body(broken)), 413, "media_too_large", "messages.0.content.0")


# ----------------------------------------------------------------------------- frame-list videos

def frame_list(count: int, size=(64, 48), sizes: list | None = None) -> str:
    """vLLM's frame-list video: data:video/jpeg;base64,<jpeg>,<jpeg>,..."""
    sizes = sizes or [size] * count
    frames = [image_bytes(s, "JPEG", (i * 30 % 255, 80, 160)) for i, s in enumerate(sizes)]
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(f).decode() for f in frames)


def prompt_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_frame_list_video_data_uri_is_accepted_and_sampled(tiny_model_dir):
    """Issue #15: vLLM's frame-list video (`data:video/jpeg;base64,<jpeg>,<jpeg>,...`) was
    refused as invalid base64. Verified: it is served; each JPEG is a frame; a list longer
    than MAX_VIDEO_FRAMES is sampled down to it (40 frames cost what 4 do with
    MAX_VIDEO_FRAMES=4, but for the text of their timestamps), and one frame alone works."""
    with InProcessServer(tiny_model_dir, preload_model=True, max_video_frames=4) as srv:
        wait_ready(srv.base_url)
        four = prompt_tokens(post(srv.base_url, video_body(frame_list(4))))
        forty = prompt_tokens(post(srv.base_url, video_body(frame_list(40))))
        text_only = prompt_tokens(post(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
        assert four > text_only and abs(forty - four) <= 4
        assert prompt_tokens(post(srv.base_url, video_body(frame_list(1)))) > text_only


def test_frame_list_videos_keep_the_video_limits(tiny_model_dir):
    """Issue #15, the limits that come with accepting frame lists. Verified: more frames
    than MAX_VIDEO_DECODED_FRAMES is 413 video_too_large; a frame over MAX_IMAGE_PIXELS is
    413 video_too_large; frames of two sizes and a frame of bad base64 are 400."""
    with InProcessServer(tiny_model_dir, preload_model=True, max_video_decoded_frames=10,
                         max_image_pixels=100 * 100) as srv:
        wait_ready(srv.base_url)
        assert_error(post(srv.base_url, video_body(frame_list(11))), 413, "video_too_large")
        assert_error(post(srv.base_url, video_body(frame_list(2, size=(200, 200)))), 413, "video_too_large")
        mixed = frame_list(2, sizes=[(64, 48), (48, 64)])
        assert_error(post(srv.base_url, video_body(mixed)), 400, "invalid_video")
        assert_error(post(srv.base_url, video_body(frame_list(3) + ",@@@@")), 400, "invalid_data_uri")


# ----------------------------------------------------------------------------- vision token budgets

def test_large_images_are_scaled_to_the_vision_token_budget_and_counted_in_the_context(media_server, tiny_model_dir):
    """Issue #15: a legal 105 KB 6000x6000 PNG became a 12-16k-token prompt whose prefill
    paused every running stream for 44-101 s. Verified with ~3,200 tokens of text and four
    3000x3000 PNGs, against the tiny model's 4,096-token context: with MAX_IMAGE_TOKENS=16
    each image costs at most 16 vision tokens (plus its 2 markers) and the request is
    served; with the default budget (here the tiny processor's own cap, 256) the same
    request is refused as context_length_exceeded, so vision tokens count in the check."""
    text = "hello there " * 460  # 7 tokens each for the tiny tokenizer
    image = {"type": "image_url", "image_url": {"url": data_uri(image_bytes((3000, 3000)), "image/png")}}
    with_images = {"messages": [{"role": "user", "content": [image] * 4 + [{"type": "text", "text": text}]}],
                   "max_tokens": 1}
    text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": 1}
    with InProcessServer(tiny_model_dir, preload_model=True, max_image_tokens=16) as srv:
        wait_ready(srv.base_url)
        words = prompt_tokens(post(srv.base_url, text_only))
        assert 3000 < words < 3800, words
        assert words < prompt_tokens(post(srv.base_url, with_images)) <= words + 4 * (16 + 2)
    assert_error(post(media_server.base_url, with_images), 400, "context_length_exceeded")


# ----------------------------------------------------------------------------- prompt size

def test_a_huge_text_body_is_refused_before_tokenizing(media_server):
    """Issue #15: a 19 MB text body was tokenized for 30-77 s before its 400. Verified: an
    8 MB message (far more characters than the 4,096-token context could hold at 16 a
    token) is a 400 context_length_exceeded within a few seconds, JSON parsing included."""
    started = time.monotonic()
    response = post(media_server.base_url, {"messages": [{"role": "user", "content": "hello there " * 700_000}]})
    assert_error(response, 400, "context_length_exceeded", "messages")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("shape", ["messages", "parts"])
def test_too_many_messages_are_refused_before_tokenizing(media_server, shape):
    """Issue #15: 550k tiny messages were templated and tokenized for 118 s before their
    400. Verified: 20,000 messages, or one message of 20,000 text parts, are a 400
    too_many_messages (MAX_MESSAGES is 1024) within a few seconds."""
    if shape == "messages":
        messages = [{"role": "user", "content": "a"}] * 20_000
    else:
        messages = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 20_000}]
    started = time.monotonic()
    assert_error(post(media_server.base_url, {"messages": messages}), 400, "too_many_messages", "messages")
    assert time.monotonic() - started < 5


def test_truncation_drops_the_fewest_turns_in_few_tokenizations(tiny_model_dir, monkeypatch):
    """Issue #15, the same work in CONTEXT_OVERFLOW=truncate: dropping one turn at a time
    tokenized the whole prompt once per dropped turn (hundreds of times here). Verified
    with 400 turns of ~90 tokens against a 4,096-token context: the prompt is tokenized
    at most 12 times, and what is kept is as much as fits (within one turn of the context)."""
    import main

    calls, real = [], main.tokenize
    monkeypatch.setattr(main, "tokenize", lambda *args: calls.append(1) or real(*args))
    turn = "hello there " * 13  # 91 tokens for the tiny tokenizer
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i in range(400)]
    messages.append({"role": "user", "content": "And now?"})
    with InProcessServer(tiny_model_dir, preload_model=True, context_overflow="truncate") as srv:
        wait_ready(srv.base_url)
        body = post(srv.base_url, {"messages": messages, "max_tokens": 1}).json()
    assert body["truncated_messages"] == 360, body  # what dropping a turn at a time gave
    assert 4096 - 120 <= body["usage"]["prompt_tokens"] < 4096
    assert len(calls) <= 12


def test_large_media_reach_the_processor_already_scaled_down(tiny_model_dir, monkeypatch):
    """Issue #15, the memory side of the budget: a 36-megapixel image (or 16 such frames)
    went to the processor whole, as float tensors of ~430 MB each, only to be scaled to a
    few hundred tokens. Verified: with MAX_IMAGE_TOKENS=16 and MAX_VIDEO_TOKENS=64 a
    3000x3000 PNG and a 1920x1080 clip reach the processor with at most 4x the pixels
    their budgets allow (1,024 pixels a token; 2 frames a token for video)."""
    import main

    seen, real = [], main.tokenize
    monkeypatch.setattr(main, "tokenize", lambda processor, messages, *rest: seen.append(
        [(m.images, m.videos) for m in messages]) or real(processor, messages, *rest))
    with InProcessServer(tiny_model_dir, preload_model=True, max_image_tokens=16, max_video_tokens=64) as srv:
        wait_ready(srv.base_url)
        image = post(srv.base_url, image_body(data_uri(image_bytes((3000, 3000)), "image/png")))
        video = post(srv.base_url, video_body(data_uri(video_bytes(1920, 1080, frames=16), "video/mp4")))
    assert image.status_code == video.status_code == 200
    [([picture], [])], [([], [frames])] = seen
    assert picture.width * picture.height <= 4 * 16 * 1024
    assert frames.shape[0] == 16 and frames.shape[0] * frames.shape[1] * frames.shape[2] <= 4 * 64 * 1024 * 2
