"""Silent loss in the session stores (issue #15): every reader sees every index once, a
failed write is never reported as success, and a client told an id finds it after a crash."""

import json
import signal
import sqlite3

import httpx
import pytest

import main
from helpers import InProcessServer, ServerProcess, event_index, joined_text, long_request, stream_events, wait_ready


def resume_in_small_reads(base_url: str, session_id: str, first: list[dict], step: int) -> list[dict]:
    """Reconnect again and again after the last seen event, reading `step` events each time."""
    events = list(first)
    while events[-1]["data"] != "[DONE]":
        headers = {"Last-Event-ID": events[-1]["id"]}
        path = f"/v1/chat/completions/{session_id}"
        _, status, more = stream_events(base_url, method="GET", path=path, params={"stream": "true"},
                                        headers=headers, limit=step)
        if status == 204:
            break
        assert status == 200, more
        events += more
    return events


def test_small_ring_with_sqlite_resume_never_skips_an_index(tiny_model_dir, tmp_path):
    """SESSION_BUFFER_EVENTS=4 with SQLite: readers that fall behind the ring used to get
    `gap 144->146` (older rows from SQLite joined to a ring that had moved on meanwhile).
    Verified: over several sessions and drop points, indexes run 0..n without a gap or a
    duplicate, and the replayed text equals the stored result."""
    with InProcessServer(tiny_model_dir, preload_model=True, persist_sessions=True, session_buffer_events=4,
                         sessions_db_path=str(tmp_path / "s.db"), stream_interval_ms=0) as srv:
        wait_ready(srv.base_url)
        for n, step in enumerate((1, 3, 7)):
            sid = f"ring-{n}"
            body = long_request(session_id=sid, max_tokens=150, seed=n)
            _, _, first = stream_events(srv.base_url, body, limit=5)
            events = resume_in_small_reads(srv.base_url, sid, first, step)
            assert [event_index(e) for e in events] == list(range(len(events)))
            stored = httpx.get(f"{srv.base_url}/v1/chat/completions/{sid}").json()
            assert stored["status"] == "completed"
            assert joined_text(events) == stored["choices"][0]["message"]["content"]
            assert joined_text(events, "reasoning_content") == (stored["choices"][0]["message"]["reasoning_content"]
                                                                or "")


def full_disk_connect(max_pages: int):
    """SQLite's own limit on the file's size raises the real SQLITE_FULL ("database or disk
    is full") on the writer's connection: a full disk without filling the machine's."""
    original = main.SQLiteWriter._connect

    def connect(self):
        conn = original(self)
        if threading_name() == "sqlite-writer":
            conn.execute(f"PRAGMA max_page_count = {max_pages}")
        return conn

    return connect


def threading_name() -> str:
    import threading

    return threading.current_thread().name


def test_disk_full_mid_stream_ends_the_stream_with_an_error_and_never_fakes_success(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """Disk full with SQLite on: the writer used to log the failed batch and carry on, so
    sessions read `completed` with 0 characters, non-streamed callers got 200 with empty
    content, streams hung without [DONE], and a later commit could make unstored events
    visible. Verified: the stream ends with a storage_failed error then [DONE], indexes
    contiguous; a non-streamed request gets a 5xx; the session reads as failed; after a
    restart (disk still full) what the client saw is still there and nothing reads as
    running forever."""
    db = tmp_path / "full.db"
    monkeypatch.setattr(main.SQLiteWriter, "_connect", full_disk_connect(12))
    with InProcessServer(tiny_model_dir, preload_model=True, persist_sessions=True, sessions_db_path=str(db),
                         stream_interval_ms=0) as srv:
        wait_ready(srv.base_url)
        _, status, events = stream_events(srv.base_url, long_request(session_id="full", max_tokens=3000))
        assert status == 200
        assert events[-1]["data"] == "[DONE]"
        assert json.loads(events[-2]["data"])["error"]["code"] == "storage_failed"
        assert [event_index(e) for e in events] == list(range(len(events)))
        result = httpx.get(srv.base_url + "/v1/chat/completions/full").json()
        assert result["status"] == "failed"
        response = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50})
        assert response.status_code >= 500 and response.json()["error"]["code"] in ("store_unavailable",
                                                                                    "generation_failed")
        seen = events[:-2]
    with InProcessServer(tiny_model_dir, persist_sessions=True, sessions_db_path=str(db)) as srv:
        _, status, replay = stream_events(srv.base_url, method="GET", path="/v1/chat/completions/full",
                                          params={"stream": "true"})
        assert status == 200 and replay[:len(seen)] == seen
        assert replay[-1]["data"] == "[DONE]"
        assert httpx.get(srv.base_url + "/v1/chat/completions/full").json()["status"] == "interrupted"
    stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM events WHERE session_id='full'").fetchone()[0]
    assert stored >= len(seen)


def test_session_told_to_a_client_survives_a_kill_9_at_once(tiny_model_dir, tmp_path):
    """kill -9 rounds: sessions created just before the kill answered 404 after restart.
    Verified: the row is committed before the client gets the id (the response headers),
    so a kill right after the headers leaves a session that reads as interrupted."""
    db = tmp_path / "s.db"
    env = {"PERSIST_SESSIONS": "1", "SESSIONS_DB_PATH": str(db)}
    first = ServerProcess(tiny_model_dir, tmp_path / "a.log", **env).start()
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", first.base_url + "/v1/chat/completions",
                           json=long_request(session_id="told", max_tokens=3000)) as response:
            assert response.headers["x-session-id"] == "told"
            first.stop(signal.SIGKILL)
    second = ServerProcess(tiny_model_dir, tmp_path / "b.log", **env).start()
    try:
        result = httpx.get(second.base_url + "/v1/chat/completions/told")
        assert result.status_code == 200 and result.json()["status"] == "interrupted"
    finally:
        second.stop()


@pytest.mark.parametrize("buffer", [4])
def test_sqlite_log_reads_whole_result_with_a_tiny_ring(tiny_model_dir, tmp_path, buffer):
    """The non-streamed answer and the GET result come from the store, not the ring:
    with SQLite and a 4-event ring both are whole and equal."""
    with InProcessServer(tiny_model_dir, preload_model=True, persist_sessions=True, session_buffer_events=buffer,
                         sessions_db_path=str(tmp_path / "r.db")) as srv:
        wait_ready(srv.base_url)
        body = long_request(session_id="whole", max_tokens=60, stream=False)
        response = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
        again = httpx.get(srv.base_url + "/v1/chat/completions/whole").json()
        assert response.json()["choices"] == again["choices"]
        assert again["usage"]["completion_tokens"] == 60
