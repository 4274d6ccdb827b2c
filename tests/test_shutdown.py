"""SIGTERM: streams in flight end with a final "cancelled" chunk and [DONE], SQLite is
flushed, and after a restart the stream replays exactly and reads as cancelled."""

import signal
import threading

import httpx

from helpers import ServerProcess, final_choice, long_request, stream_events, wait_generating


def test_sigterm_finishes_streams_with_a_final_event_and_flushes_sqlite(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    env = dict(PERSIST_SESSIONS="1", SESSIONS_DB_PATH=str(db))
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", **env).start()
    seen = {}
    reader = threading.Thread(target=lambda: seen.update(
        events=stream_events(srv.base_url, long_request(max_tokens=3000, session_id="at-shutdown"))[2]))
    reader.start()
    wait_generating(srv.base_url, "at-shutdown", timeout=10)
    srv.stop(signal.SIGTERM)
    reader.join(timeout=30)
    events = seen["events"]
    assert events[-1]["data"] == "[DONE]"
    assert (final_choice(events)["finish_reason"], final_choice(events)["end_reason"]) == ("stop", "cancelled")
    again = ServerProcess(tiny_model_dir, tmp_path / "server2.log", **env).start()
    try:
        _, _, replay = stream_events(again.base_url, method="GET", path="/v1/chat/completions/at-shutdown",
                                     params={"stream": "true"})
        assert replay == events
        assert httpx.get(again.base_url + "/v1/chat/completions/at-shutdown").json()["status"] == "cancelled"
    finally:
        again.stop()
