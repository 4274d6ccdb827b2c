"""The benchmark's shared workload: prompts and the 640x480 test image."""

import base64
import io

TEXT_PROMPT = "Describe a quiet morning in a small harbour town."
# P7's long prompt: these words repeated; the repeat count that gives ~N tokens is
# measured on the server's tokenizer (bench/run.py asks for prompt_tokens in usage).
LONG_PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while a small boat leaves the harbour. "


def image_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A deterministic noisy 640x480 JPEG (noise keeps the codec honest)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def image_data_uri() -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image_jpeg()).decode()


def chat_body(tokens: int, *, image: bool = False, stream: bool = True, seed: int = 0, **extra) -> dict:
    content: list[dict] = [{"type": "text", "text": TEXT_PROMPT}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_uri()}})
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "min_tokens": tokens, "ignore_eos": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": seed,
            "stream": stream, "stream_options": {"include_usage": True}, **extra}


def long_prompt_body(repeats: int, tokens: int, *, seed: int = 0) -> dict:
    """A text request whose prompt is LONG_PROMPT_WORDS `repeats` times. It opens with its
    seed, so no two requests share more than the template's first tokens (a prefix cache
    must not turn the long prefill into a short one)."""
    body = chat_body(tokens, seed=seed)
    body["messages"][0]["content"][0]["text"] = f"Request {seed}. " + LONG_PROMPT_WORDS * repeats
    return body


def video_mp4(frames: int = 16, size: int = 512) -> bytes:
    """A deterministic `frames`-frame mpeg4 clip of size x size pixels: moving gradients with
    a little noise (a real clip's size: about 1,000 vision tokens per 8 sampled frames at 512)."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.stack([np.add.outer(ramp, ramp * 0) + 8 * i, np.add.outer(ramp * 0, ramp) - 8 * i,
                               np.full((size, size), 40.0 * (i % 6))], axis=-1)
            pixels = (pixels + rng.normal(0, 6, pixels.shape)) % 256
            frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def video_body(tokens: int, *, seed: int = 0) -> dict:
    """A request with one video (video_mp4, as a data URI) and a short question."""
    body = chat_body(tokens, seed=seed)
    uri = "data:video/mp4;base64," + base64.b64encode(video_mp4()).decode()
    body["messages"][0]["content"] = [{"type": "video_url", "video_url": {"url": uri}},
                                      {"type": "text", "text": f"Request {seed}. What happens in this video?"}]
    return body
