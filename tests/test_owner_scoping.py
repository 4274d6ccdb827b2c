"""Sessions belong to the API key that created them (issue #15), and no key reaches a log."""

import httpx

from helpers import ServerProcess, long_request, stream_events

K1, K2 = "key-one-0123456789", "key-two-9876543210"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_another_key_can_neither_read_resume_cancel_nor_detect_a_session(tiny_model_dir, tmp_path):
    """With API_KEY=k1,k2, key 2 could read, resume and cancel key 1's session by its id,
    and a 409 on create told key 2 the id existed. Verified: every such call by key 2 is a
    404, key 2 creating the same id gets a session of its own, key 1's session is untouched;
    and neither key nor message text appears in the server log."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model_dir, log, API_KEY=f"{K1},{K2}").start()
    try:
        base = server.base_url
        secret_text = "the-user-message-must-not-be-logged"
        body = long_request(session_id="chat-1", max_tokens=40,
                            messages=[{"role": "user", "content": secret_text}])
        _, status, mine = stream_events(base, body, headers=auth(K1))
        assert status == 200 and mine[-1]["data"] == "[DONE]"
        path = base + "/v1/chat/completions/chat-1"
        assert httpx.get(path, headers=auth(K2)).status_code == 404
        assert httpx.get(path, headers=auth(K2), params={"stream": "true"}).status_code == 404
        resumed = httpx.post(base + "/v1/chat/completions", json=body,
                             headers={**auth(K2), "Last-Event-ID": "chat-1:3"})
        assert resumed.status_code == 404
        assert httpx.post(base + "/v1/cancel/chat-1", headers=auth(K2)).status_code == 404
        _, status, theirs = stream_events(base, {**body, "max_tokens": 5}, headers=auth(K2))
        assert status == 200 and theirs[-1]["data"] == "[DONE]"
        assert httpx.get(path, headers=auth(K1)).json()["usage"]["completion_tokens"] == 40
        assert httpx.get(path, headers=auth(K2)).json()["usage"]["completion_tokens"] == 5
        assert httpx.get(path, headers=auth("wrong")).status_code == 401
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    for secret in (K1, K2, secret_text):
        assert secret not in text
