"""PERSIST_SESSIONS=1: streams replay from SQLite after a restart, and a crash leaves
every event a client saw intact, closed as interrupted."""

import json
import signal
import sqlite3

import httpx

from helpers import ServerProcess, chunk_payloads, long_request, stream_events, wait_until


def persistent_server(tiny_model_dir, tmp_path, db, **env) -> ServerProcess:
    return ServerProcess(tiny_model_dir, tmp_path / "server.log", PERSIST_SESSIONS="1", SESSIONS_DB_PATH=str(db),
                         **env)


def test_sessions_replay_after_a_clean_restart(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    first = persistent_server(tiny_model_dir, tmp_path, db).start()
    try:
        body = long_request(session_id="survives", max_tokens=80, stream_options={"include_usage": True})
        _, _, events = stream_events(first.base_url, body)
        whole = httpx.get(first.base_url + "/v1/chat/completions/survives").json()
    finally:
        assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
        assert "shutdown complete" in first.log_text()
    second = persistent_server(tiny_model_dir, tmp_path, db).start()
    try:
        _, status, replay = stream_events(second.base_url, method="GET", path="/v1/chat/completions/survives",
                                          params={"stream": "true"})
        assert status == 200 and replay == events
        after = stream_events(second.base_url, body, headers={"Last-Event-ID": events[10]["id"]})[2]
        assert after == events[11:]
        assert httpx.get(second.base_url + "/v1/chat/completions/survives").json() == whole
        assert whole["status"] == "completed" and whole["usage"]["completion_tokens"] == 80
        conflict = httpx.post(second.base_url + "/v1/chat/completions", json=body)
        assert conflict.status_code == 409
    finally:
        second.stop()


def test_kill_9_mid_stream_leaves_committed_events_and_reads_as_interrupted(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    first = persistent_server(tiny_model_dir, tmp_path, db).start()
    body = long_request(session_id="crashed", max_tokens=3000)
    _, _, seen = stream_events(first.base_url, body, limit=30)
    first.stop(signal.SIGKILL)

    second = persistent_server(tiny_model_dir, tmp_path, db).start()
    try:
        _, status, replay = stream_events(second.base_url, method="GET", path="/v1/chat/completions/crashed",
                                          params={"stream": "true"})
        assert status == 200
        assert replay[:len(seen)] == seen, "every event a client saw must survive the crash"
        assert [e["id"] for e in replay] == [f"crashed:{i}" for i in range(len(replay))]
        assert replay[-1]["data"] == "[DONE]"
        assert json.loads(replay[-2]["data"])["error"]["code"] == "interrupted"
        whole = httpx.get(second.base_url + "/v1/chat/completions/crashed").json()
        assert whole["status"] == "interrupted"
        resumed = stream_events(second.base_url, body, headers={"Last-Event-ID": seen[-1]["id"]})[2]
        assert resumed == replay[len(seen):]
    finally:
        second.stop()


def test_finished_sessions_expire_from_memory_and_database(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    srv = persistent_server(tiny_model_dir, tmp_path, db, SESSIONS_TTL_SECONDS="1").start()
    try:
        stream_events(srv.base_url, long_request(session_id="short-lived", max_tokens=5))
        assert httpx.get(srv.base_url + "/v1/chat/completions/short-lived").status_code == 200
        wait_until(lambda: httpx.get(srv.base_url + "/v1/chat/completions/short-lived").status_code == 404,
                   timeout=15, interval=0.2, message="session expired")
    finally:
        srv.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events WHERE session_id='short-lived'").fetchone() == (0,)


def test_sqlite_holds_the_same_events_the_stream_sent(tiny_model_dir, tmp_path):
    db = tmp_path / "sessions.db"
    srv = persistent_server(tiny_model_dir, tmp_path, db).start()
    try:
        _, _, events = stream_events(srv.base_url, long_request(session_id="on-disk", max_tokens=40))
    finally:
        srv.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT idx, data FROM events WHERE session_id='on-disk' ORDER BY idx").fetchall()
        status = conn.execute("SELECT status, completion_tokens FROM sessions WHERE id='on-disk'").fetchone()
    assert [(f"on-disk:{i}", d) for i, d in rows] == [(e["id"], e["data"]) for e in events]
    assert status == ("completed", 40)
    assert chunk_payloads(events)[-1] == "[DONE]"
