"""Logs: requests are named by their X-Request-Id and sessions by id; message text, API
keys, the Authorization scheme and media bytes never reach the log."""

import httpx

from helpers import HI, ServerProcess, image_message, png_data_uri, post, stream_events


def test_logs_carry_request_ids_and_never_bodies_keys_or_media(tiny_model_dir, tmp_path):
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", API_KEY="sekrit-key-123").start()
    try:
        secret_text = "my-private-question-42"
        image = png_data_uri(size=(40, 40))
        auth = {"Authorization": "Bearer sekrit-key-123", "X-Request-Id": "req-abc"}
        post(srv.base_url, {"messages": image_message(image) + [{"role": "user", "content": secret_text}],
                            "max_tokens": 3}, headers=auth)
        stream_events(srv.base_url, {"messages": HI, "max_tokens": 3, "stream": True, "session_id": "logged"},
                      headers=auth)
        httpx.post(srv.base_url + "/v1/cancel/logged", headers=auth)
    finally:
        srv.stop()
    log = srv.log_text()
    assert "[req-abc]" in log and "session logged start" in log
    for leaked in (secret_text, "sekrit-key-123", image[30:60], "Bearer"):
        assert leaked not in log
