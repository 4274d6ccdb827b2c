"""Raw reference for the benchmark: plain `model.generate` in a fresh process set up like the server.

Prints one JSON object: tokens/s for one 512-token generation, and prefill times (time to
the first generated token, preprocessing included) for a text and a 640x480 image prompt.
Usage: python bench/raw.py MODEL_DIR REPS TOKENS
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from workload import TEXT_PROMPT, image_jpeg


def main(model_dir: str, reps: int, tokens: int) -> dict:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    jpeg = image_jpeg()

    def inputs_for(with_image: bool):
        content = [{"type": "text", "text": TEXT_PROMPT}]
        images = None
        if with_image:
            content.insert(0, {"type": "image"})
            images = [Image.open(io.BytesIO(jpeg)).convert("RGB")]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        return processor(text=[prompt], images=images, return_tensors="pt")

    def generate(with_image: bool, new_tokens: int) -> float:
        started = time.perf_counter()
        inputs = inputs_for(with_image)
        torch.manual_seed(0)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0)
        return time.perf_counter() - started

    generate(False, 8)  # warm-up
    throughput = [tokens / generate(False, tokens) for _ in range(reps)]
    text_prefill = [generate(False, 1) for _ in range(reps * 3)]
    image_prefill = [generate(True, 1) for _ in range(reps * 3)]
    return {"tokens_per_s": statistics.median(throughput),
            "prefill_text_ms": statistics.median(text_prefill) * 1000,
            "prefill_image_ms": statistics.median(image_prefill) * 1000}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
