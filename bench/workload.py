"""The benchmark's shared workload: prompts and the 640x480 test image."""

import base64
import io

TEXT_PROMPT = "Describe a quiet morning in a small harbour town."


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
