"""Regenerate docs/screenshot.png: the chat page showing an illustrative conversation.

The conversation is written here, not generated (the tiny test checkpoint only produces
noise); the page renders it from localStorage exactly as it renders stored answers.

    SERVED_MODEL_NAME=Qwen/Qwen3-VL-2B-Thinking python main.py &   # any model: the page only asks /health
    python docs/screenshot.py http://127.0.0.1:3000
"""

import base64
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.sync_api import sync_playwright

ANSWER = """The picture shows three simple shapes on a white background:

- a **red square** on the left,
- a **blue circle** in the middle,
- a **green triangle** on the right.

To find the shapes yourself, threshold each colour channel:

```python
mask = (img[..., 0] > 200) & (img[..., 1] < 80)  # red pixels
```"""

REASONING = "The user wants the image described. I see a white canvas with three filled shapes..."


def shapes_png() -> str:
    image = Image.new("RGB", (360, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 70, 120, 160), fill=(220, 50, 50))
    draw.ellipse((140, 70, 230, 160), fill=(40, 110, 220))
    draw.polygon([(250, 160), (340, 160), (295, 70)], fill=(40, 170, 90))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def history() -> dict:
    user = {"id": "u1", "role": "user", "text": "What is in this picture?",
            "attachments": [{"kind": "image", "name": "shapes.png", "type": "image/png", "size": 1200,
                             "url": shapes_png()}]}
    answer = {"id": "a1", "role": "assistant", "sessionId": "web-example", "lastIndex": 40, "status": "completed",
              "reasoning": REASONING, "content": ANSWER, "finishReason": "stop", "timed": True,
              "usage": {"prompt_tokens": 312, "completion_tokens": 86, "total_tokens": 398},
              "firstTokenAt": 1000, "reasoningEndAt": 3400, "endedAt": 5300}
    return {"v": 1, "messages": [user, answer]}


def main(base_url: str, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page(viewport={"width": 960, "height": 820}, color_scheme="light")
        page.goto(base_url)
        page.evaluate("(h) => localStorage.setItem('qwen3vl.chat.v1', JSON.stringify(h))", history())
        page.goto(base_url)
        page.wait_for_selector(".msg.assistant .answer figure")
        page.fill("#prompt", "Now count the corners.")
        page.wait_for_timeout(600)  # let the entry animations finish
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000", Path(__file__).with_name("screenshot.png"))
