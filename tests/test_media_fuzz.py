"""Media decoding fuzzed with mutated real files (issue #15): crafted headers alone missed
the mutated MP4s that raised AttributeError. Real small MP4, WebM, AVI, MPEG-TS and GIF
clips and PNG, JPEG, GIF and WebP images are written here with PyAV and PIL, then bytes
are flipped, cut, duplicated and inserted by a seeded random mutator. Whatever arrives,
the server answers 200 or a 4xx, never a 5xx, and never holds a request long."""

import base64
import io
import random
import time

import httpx
import numpy as np
import pytest

from helpers import InProcessServer, wait_ready

CASES = 200
SEED = 15


def clip(fmt: str, codec: str, pix_fmt: str = "yuv420p", frames: int = 24, size: int = 48) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = 6
        for i in range(frames):
            image = np.roll(np.random.RandomState(i).randint(0, 255, (size, size, 3), np.uint8), i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def picture(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (40, 56, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def seeds() -> list[tuple[str, str, bytes]]:
    """(part type, mime, bytes) of each real file the mutations start from."""
    videos = [("mp4", "mpeg4", "yuv420p"), ("mp4", "libx264", "yuv420p"), ("webm", "libvpx-vp9", "yuv420p"),
              ("avi", "mpeg4", "yuv420p"), ("mpegts", "mpeg2video", "yuv420p"), ("gif", "gif", "rgb8")]
    out = [("video_url", f"video/{fmt}", clip(fmt, codec, pix)) for fmt, codec, pix in videos]
    return out + [("image_url", f"image/{fmt.lower()}", picture(fmt)) for fmt in ("PNG", "JPEG", "GIF", "WEBP")]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four edits: flip bytes, cut the tail, duplicate a slice, insert noise, or
    overwrite a slice with 0x00 or 0xFF (sizes and counts in headers go extreme)."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        edit = rng.randrange(5)
        if edit == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif edit == 1:
            del data[max(at, 16):]
        elif edit == 2:
            start = rng.randrange(len(data))
            data[at:at] = data[start:start + rng.randint(1, 256)]
        elif edit == 3:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            data[at:at + 4] = rng.choice([b"\0", b"\xff"]) * 4
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    with InProcessServer(tiny_model_dir, preload_model=True, max_tokens=1, max_queue=64) as srv:
        wait_ready(srv.base_url)
        yield srv


def test_mutated_media_files_never_get_a_server_error(fuzz_server):
    rng = random.Random(SEED)
    files = seeds()
    statuses, slowest = {}, 0.0
    with httpx.Client(timeout=60) as client:
        for case in range(CASES):
            part, mime, original = files[case % len(files)]
            data = original if case < len(files) else mutate(original, rng)
            url = f"data:{mime};base64," + base64.b64encode(data).decode()
            body = {"messages": [{"role": "user", "content": [{"type": part, part: {"url": url}}]}], "max_tokens": 1}
            started = time.monotonic()
            response = client.post(fuzz_server.base_url + "/v1/chat/completions", json=body)
            slowest = max(slowest, time.monotonic() - started)
            assert response.status_code < 500, (case, mime, response.text[:300])
            if case < len(files):
                assert response.status_code == 200, (mime, response.text[:300])  # every seed file is served
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert slowest < 10, slowest
    assert statuses.get(200, 0) > len(files) and statuses.get(400, 0) > 0, statuses
