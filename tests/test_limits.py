"""Request limits: a body over MAX_REQUEST_BYTES, and images or videos over their pixel,
count, byte or duration limits, are refused with 413 (an unreadable format with 400)
before any decoding, each with its own error code; within limits they are served."""

import io
import os
import tempfile

import httpx

from helpers import HI, assert_error, data_uri, image_message, mp4_data_uri, png_data_uri, post, video_message


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
    assert post(strict.base_url, {"messages": HI, "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------- images and video

def test_image_over_pixel_limit_is_413_before_decoding(strict):
    response = post(strict.base_url, {"messages": image_message(png_data_uri(size=(200, 200)))})
    assert_error(response, 413, "image_too_large", "messages.0.content.0")


def test_image_in_unsupported_format_is_400(strict):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    url = data_uri(buf.getvalue(), "image/tiff")
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
    big = data_uri(os.urandom(90_000), "video/mp4")
    assert_error(post(strict.base_url, {"messages": video_message(big)}), 413, "media_too_large")


def test_short_video_within_limits_is_served_and_leaves_no_temp_files(strict, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    response = post(strict.base_url, {"messages": video_message(mp4_data_uri(frames=6)), "max_tokens": 2})
    assert response.status_code == 200
    assert_error(post(strict.base_url, {"messages": video_message(mp4_data_uri(frames=12))}), 413)
    assert list(tmp_path.iterdir()) == []
