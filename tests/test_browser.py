"""The chat page at / in a real headless Chromium (Debian's), driven by Playwright, against
`python main.py` on the tiny checkpoint (issue #13).

Every wait is on page or server state (DOM attributes, /metrics, the stored result), never
a fixed sleep. Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading

import httpx
import pytest

from helpers import ROOT, ServerProcess, mp4_bytes, wait_ready

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = ROOT / "tests" / "artifacts"
KEY = "browser-key-0123456789abcdef"
STORY = "Tell me a story."
# Seed 4 at temperature 1 makes the tiny model think for ~350 tokens, then answer (it
# closes its think block itself; see tests/tiny_model.py).
THINK_THEN_ANSWER = {"seed": 4, "temperature": 1.0, "ignore_eos": True}
TIMEOUT_MS = 60_000


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def keyed_server_booting(tiny_model_dir, tmp_path_factory):
    """`python main.py` with API_KEY set, started with the browser so that it boots while
    the first tests run (~10 s less on 2 cores)."""
    server = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("keyed") / "server.log", API_KEY=KEY)
    yield server.start(wait=False)
    server.stop()


@pytest.fixture
def keyed_server(keyed_server_booting):
    wait_ready(keyed_server_booting.base_url)
    return keyed_server_booting


@pytest.fixture(scope="module")
def browser(keyed_server_booting):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, **context options) -> a fresh page (own localStorage) that fails the
    test on any page error or any request leaving the server's origin."""
    contexts, problems = [], []

    def opener(url: str, **options):
        context = browser.new_context(base_url=url, **{"viewport": {"width": 1100, "height": 800}, **options})
        contexts.append(context)

        def check_origin(request) -> None:
            if not request.url.startswith((url + "/", "data:", "blob:")):
                problems.append(f"request off origin: {request.url}")

        context.on("request", check_origin)
        context.on("weberror", lambda e: problems.append(f"page error: {e.error}"))
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        goto_chat(page)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert not problems


# ----------------------------------------------------------------------------- helpers

def goto_chat(page, url: str = "/") -> None:
    page.goto(url)
    page.wait_for_selector("html[data-ready=true]", state="attached")


def set_extra(page, **params) -> None:
    """Settings > Extra request parameters, as a user would fill it."""
    page.click("#open-settings")
    page.fill("#set-extra", json.dumps(params))
    page.click("#settings .primary")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def last_answer(page):
    return page.locator(".msg.assistant").last


def expect_status(page, want: str, *others: str) -> None:
    """Until the last answer ends as `want` or one of `others`; it must be `want` (a
    failure shows what the page said)."""
    selector = ", ".join(f".msg.assistant:last-child[data-status={s}]" for s in (want, *others))
    page.wait_for_selector(selector, state="attached")
    status = last_answer(page).get_attribute("data-status")
    assert status == want, f"{status}: {last_answer(page).locator('.notice').text_content()}"


def wait_answer_text(page) -> None:
    """Until the last answer shows some of its content while it is still being written."""
    page.wait_for_function("""() => {
        const a = document.querySelector('.msg.assistant:last-child');
        return a && a.dataset.status === 'streaming' && a.querySelector('.answer').dataset.text;
    }""")


def stored_answer(page) -> dict:
    """The last assistant message as the page keeps it in localStorage."""
    return json.loads(page.evaluate("localStorage.getItem('qwen3vl.chat.v1')"))["messages"][-1]


def server_result(base_url: str, session_id: str, headers: dict | None = None) -> dict:
    response = httpx.get(f"{base_url}/v1/chat/completions/{session_id}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match[1]) if match else 0.0


def generations(base_url: str) -> tuple[float, float]:
    """(POSTs answered, completion tokens): the page resumes with GET, so a second
    generation would show up as a second POST and more tokens."""
    return (metric(base_url, "qwen_http_requests_total", route="/v1/chat/completions", status="200"),
            metric(base_url, "qwen_completion_tokens_total"))


def assert_same_as_server(page, base_url: str, headers: dict | None = None) -> dict:
    """What the page shows and keeps equals the server's stored result, text for text."""
    mine = stored_answer(page)
    theirs = server_result(base_url, mine["sessionId"], headers)
    message = theirs["choices"][0]["message"]
    assert mine["content"] == message["content"]
    assert mine["reasoning"] == (message["reasoning_content"] or "")
    assert last_answer(page).locator(".answer").get_attribute("data-text") == message["content"]
    return theirs


def png_bytes(color=(30, 120, 200), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


DISPATCH_FILE = """([event, selector, name, type, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, { type }));
    const init = { bubbles: true, cancelable: true };
    const e = event === 'paste' ? new ClipboardEvent('paste', { ...init, clipboardData: data })
                                : new DragEvent(event, { ...init, dataTransfer: data });
    document.querySelector(selector).dispatchEvent(e);
}"""


def drop_or_paste(page, event: str, selector: str, name: str, mime: str, data: bytes) -> None:
    page.evaluate(DISPATCH_FILE, [event, selector, name, mime, base64.b64encode(data).decode()])


class CuttableProxy:
    """A TCP proxy between the browser and the server that the test can cut: `cut()`
    drops every open connection and refuses new ones until `restore()`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: set[socket.socket] = set()
        self.refusing = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source, target)

    def _drop(self, *sockets: socket.socket) -> None:
        for s in sockets:
            with self.lock:
                self.open.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> None:
        self.refusing = True
        with self.lock:
            sockets = list(self.open)
        self._drop(*sockets)

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


# ----------------------------------------------------------------------------- chat

def test_thinking_then_answer_stream_in_and_end_with_token_counts(open_page, base_url):
    page = open_page(base_url)
    set_extra(page, **THINK_THEN_ANSWER, max_tokens=500)
    send(page, STORY)
    thinking = last_answer(page).locator(".thinking")
    page.wait_for_function("""() => {  // thinking shows live, open, before any answer
        const a = document.querySelector('.msg.assistant:last-child');
        const t = a?.querySelector('.thinking.active[open] .thinking-body')?.dataset.text;
        return t && !a.querySelector('.answer').dataset.text;
    }""")
    wait_answer_text(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-mid-answer.png")
    expect_status(page, "completed", "cancelled", "failed")
    assert thinking.get_attribute("open") is None  # folds away once the answer starts
    assert re.fullmatch(r"Thought for [\d.]+ s", thinking.locator(".thinking-label").inner_text())
    stats = last_answer(page).locator(".stats").inner_text()
    assert re.match(r"500 tokens · [\d.]+ tok/s · [\d.]+ s · prompt \d+", stats), stats
    result = assert_same_as_server(page, base_url)
    assert result["choices"][0]["message"]["reasoning_content"] and result["choices"][0]["message"]["content"]
    thinking.locator("summary").click()
    assert thinking.get_attribute("open") is not None


def test_images_and_video_attach_by_picker_paste_and_drop(open_page, base_url, tmp_path):
    page = open_page(base_url)
    set_extra(page, max_tokens=8, ignore_eos=True)
    picked = tmp_path / "picked.png"
    picked.write_bytes(png_bytes())
    page.set_input_files("#file", str(picked))
    drop_or_paste(page, "paste", "#prompt", "pasted.png", "image/png", png_bytes(color=(200, 40, 40)))
    drop_or_paste(page, "drop", "body", "clip.mp4", "video/mp4", mp4_bytes(frames=8))
    # a function, not an expression: Playwright polls an expression with eval, which the page's CSP refuses
    page.wait_for_function("() => document.querySelectorAll('#attachments .chip').length === 3")
    assert page.locator("#attachments .chip[data-kind=video]").count() == 1
    send(page, "What is in these?")
    expect_status(page, "completed", "failed", "refused")
    user = page.locator(".msg.user").last
    assert user.locator("img.thumb").count() == 2 and user.locator("video.thumb").count() == 1
    assert page.locator("#attachments").is_hidden()
    text_only = httpx.post(base_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is in these?"}], "max_tokens": 1}, timeout=30).json()
    # the vision tokens of two images and a video are in the prompt the page sent
    assert stored_answer(page)["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 6
    assert_same_as_server(page, base_url)


def test_a_refused_attachment_shows_the_servers_error(open_page, base_url, tmp_path):
    page = open_page(base_url)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#attachments .chip")
    send(page, "And this one?")
    expect_status(page, "refused", "completed")
    notice = last_answer(page).locator(".notice").inner_text()
    assert notice.startswith("The server refused this message: The image could not be decoded")
    assert last_answer(page).locator(".retry").is_visible()


def test_stop_ends_the_answer_as_cancelled(open_page, base_url):
    page = open_page(base_url)
    set_extra(page, max_tokens=4000, ignore_eos=True, seed=7, temperature=1.0)
    send(page, STORY)
    wait_answer_text(page)
    page.click("#stop")
    expect_status(page, "cancelled", "completed")
    assert last_answer(page).locator(".notice").inner_text() == "Stopped."
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    result = assert_same_as_server(page, base_url)
    assert result["status"] == "cancelled" and result["choices"][0]["end_reason"] == "cancelled"
    assert result["usage"]["completion_tokens"] < 4000


# ----------------------------------------------------------------------------- surviving the network

def test_reload_and_reopened_tab_resume_the_answer_without_generating_twice(open_page, base_url):
    page = open_page(base_url)
    set_extra(page, max_tokens=1200, ignore_eos=True, seed=11, temperature=1.0)
    posts, tokens = generations(base_url)
    resumes = metric(base_url, "qwen_stream_resumes_total")
    send(page, STORY)
    wait_answer_text(page)
    session = stored_answer(page)["sessionId"]
    page.reload()
    page.wait_for_selector("html[data-ready=true]", state="attached")
    assert last_answer(page).get_attribute("data-session") == session
    assert server_result(base_url, session)["status"] == "in_progress"  # the reload really was mid-answer
    shown = len(stored_answer(page)["content"])
    page.wait_for_function("""(shown) => {  // re-attached: the answer grows again
        const a = document.querySelector('.msg.assistant:last-child');
        return (a.querySelector('.answer').dataset.text || '').length > shown;
    }""", arg=shown)
    context = page.context
    page.close()  # and the tab closes mid-answer...
    page = context.new_page()  # ...and is opened again
    goto_chat(page)
    expect_status(page, "completed", "failed", "lost")
    result = assert_same_as_server(page, base_url)
    assert result["usage"]["completion_tokens"] == 1200
    assert generations(base_url) == (posts + 1, tokens + 1200)  # one generation, whatever the readers did
    assert metric(base_url, "qwen_stream_resumes_total") >= resumes + 1
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1


def test_cut_network_reconnects_and_finishes_without_gap_or_duplicate(open_page, base_url, server):
    proxy = CuttableProxy(server.port)
    try:
        page = open_page(proxy.url)
        set_extra(page, max_tokens=1000, ignore_eos=True, seed=5, temperature=1.0)
        resumes = metric(base_url, "qwen_stream_resumes_total")
        send(page, STORY)
        wait_answer_text(page)
        proxy.cut()
        page.wait_for_selector(".msg.assistant:last-child .conn:has-text('reconnecting…')")
        seen = len(stored_answer(page)["content"])
        proxy.restore()
        expect_status(page, "completed", "failed", "lost")
        assert last_answer(page).locator(".conn").is_hidden()
        result = assert_same_as_server(page, base_url)
        assert len(result["choices"][0]["message"]["content"]) > seen
        assert metric(base_url, "qwen_stream_resumes_total") >= resumes + 1
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- API keys

def test_with_an_api_key_the_page_asks_for_it_then_works(open_page, keyed_server):
    base = keyed_server.base_url
    page = open_page(base)
    panel = page.locator("#key-panel")
    panel.wait_for()
    assert "needs an API key" in panel.inner_text()
    assert page.locator("#send").is_disabled()
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:has-text('refused')")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    panel.wait_for(state="hidden")
    set_extra(page, max_tokens=30, ignore_eos=True)
    send(page, "Say hello.")
    expect_status(page, "completed", "failed", "refused")
    assert_same_as_server(page, base, {"Authorization": f"Bearer {KEY}"})
    goto_chat(page)  # the key is kept: no prompt after a reload
    assert panel.is_hidden() and page.locator(".msg.assistant").count() == 1


def test_event_source_resumes_with_the_read_token_and_no_key_in_the_url(open_page, keyed_server):
    """A browser client that uses EventSource (which cannot send Authorization) reads a
    session with the X-Read-Token the POST returned; the token never reaches the log."""
    base = keyed_server.base_url
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": STORY}], "max_tokens": 40, "ignore_eos": True,
                            "stream": True}, timeout=30) as response:
        session, token = response.headers["x-session-id"], response.headers["x-read-token"]
        response.read()
    page = open_page(base)
    texts = page.evaluate("""([session, token]) => new Promise((resolve, reject) => {
        const texts = [];
        const source = new EventSource(`/v1/chat/completions/${session}?stream=true&read_token=${token}`);
        source.onmessage = (e) => {
            if (e.data === '[DONE]') { source.close(); resolve(texts); return; }
            for (const c of JSON.parse(e.data).choices || []) {
                texts.push(c.delta.content || c.delta.reasoning_content || '');
            }
        };
        source.onerror = () => { source.close(); reject(new Error('EventSource failed')); };
    })""", [session, token])
    result = server_result(base, session, {"Authorization": f"Bearer {KEY}"})["choices"][0]["message"]
    assert "".join(texts) == (result["reasoning_content"] or "") + result["content"]
    refused = page.evaluate("""(session) => new Promise((resolve) => {
        const source = new EventSource(`/v1/chat/completions/${session}?stream=true&read_token=forged`);
        source.onerror = () => { resolve(source.readyState); source.close(); };
    })""", session)
    assert refused == 2  # CLOSED: a 401 is final for EventSource
    log = keyed_server.log_text()
    assert "read_token=***" in log and token not in log and KEY not in log


# ----------------------------------------------------------------------------- parsing and safety

SSE_TEXT = (': ping\r\n\r\nretry: 3000\r\nid: s:0\r\ndata: {"t":"é中😀"}\r\n\r\n'
            "id: s:1\r\ndata: one\r\ndata: two\r\n\r\nid: s:2\ndata: [DONE]\n\n")
SPLIT_EVERYWHERE = """async (text) => {
    const { sseEvents } = await import('/static/stream.js');
    const bytes = new TextEncoder().encode(text);
    const parse = async (cuts) => {
        const body = new ReadableStream({ start(c) {
            [0, ...cuts].forEach((at, i) => c.enqueue(bytes.slice(at, [...cuts, bytes.length][i])));
            c.close();
        } });
        const out = [];
        for await (const event of sseEvents(new Response(body))) out.push(event);
        return JSON.stringify(out);
    };
    const whole = await parse([]);
    const differ = [];
    for (let i = 1; i < bytes.length; i++) {
        for (const cuts of [[i], [i, Math.min(i + 1, bytes.length)], [i, Math.min(i + 5, bytes.length)]]) {
            if (await parse(cuts) !== whole) differ.push(cuts);
        }
    }
    return { events: JSON.parse(whole), differ };
}"""


def test_sse_parser_gives_the_same_events_for_every_split_of_the_bytes(open_page, base_url):
    """The page's SSE reader sees whatever pieces TCP delivers: a \r\n or a UTF-8 character cut in
    two must not change an event (a lost `id:` would look like a gap)."""
    page = open_page(base_url)
    result = page.evaluate(SPLIT_EVERYWHERE, SSE_TEXT)
    assert result["events"] == [{"id": "s:0", "data": '{"t":"é中😀"}'}, {"id": "s:1", "data": "one\ntwo"},
                                {"id": "s:2", "data": "[DONE]"}]
    assert result["differ"] == []


HOSTILE = """Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script>

[click me](javascript:window.__pwned=3) or [docs](https://example.com/docs) or https://example.com/x.

**bold _and italic_** `<b>code</b>`

- one
- two
  1. nested

```html
<script>window.__pwned=4</script>
```
"""


def test_model_output_is_rendered_as_markdown_never_as_html_on_a_phone(open_page, base_url):
    page = open_page(base_url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    history = {"v": 1, "messages": [
        {"id": "u1", "role": "user", "text": "<b>not bold</b>", "attachments": []},
        {"id": "a1", "role": "assistant", "sessionId": "web-old", "lastIndex": 9, "status": "completed",
         "reasoning": "Thinking about <i>it</i>", "content": HOSTILE, "usage": None, "finishReason": "stop"}]}
    page.evaluate("(h) => localStorage.setItem('qwen3vl.chat.v1', JSON.stringify(h))", history)
    goto_chat(page)
    answer = last_answer(page).locator(".answer")
    answer.wait_for()
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".msg img:not(.thumb), .msg script, .msg b, .msg i").count() == 0
    hrefs = answer.locator("a").evaluate_all("links => links.map((a) => a.href)")
    assert hrefs == ["https://example.com/docs", "https://example.com/x"]
    assert "<img src=x onerror=" in answer.inner_text() and "[click me](javascript:" in answer.inner_text()
    assert answer.locator("strong em").inner_text() == "and italic"
    assert answer.locator("p code").inner_text() == "<b>code</b>"
    assert answer.locator("ul > li").count() == 2 and answer.locator("ul ol > li").inner_text() == "nested"
    assert answer.locator("figure.code code").inner_text() == "<script>window.__pwned=4</script>"
    assert page.locator(".msg.user .bubble").inner_text() == "<b>not bold</b>"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    assert page.locator("#prompt").is_visible() and page.locator("#send").is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "phone.png")
