"""GET /metrics: Prometheus text, scraped after real traffic."""

import httpx

from helpers import HI, long_request, scrape, stream_events, value, wait_status


def test_metrics_count_requests_tokens_latencies_sessions_resumes_and_cancellations(make_server):
    srv = make_server(cancel_after_disconnect_seconds=0.5)
    before = scrape(srv.base_url)
    assert value(before, "qwen_model_state", state="ready") == 1.0
    assert value(before, "qwen_model_load_seconds") > 0

    body = {"messages": HI, "max_tokens": 12, "ignore_eos": True}
    assert httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    _, _, events = stream_events(srv.base_url, {**body, "stream": True, "session_id": "m-1"})
    stream_events(srv.base_url, {**body, "stream": True}, headers={"Last-Event-ID": events[2]["id"]})
    httpx.get(srv.base_url + "/v1/chat/completions/no-such-session")
    stream_events(srv.base_url, long_request(session_id="m-manual"), limit=2)
    httpx.post(srv.base_url + "/v1/cancel/m-manual", timeout=30)
    stream_events(srv.base_url, long_request(session_id="m-auto"), limit=2)
    wait_status(srv.base_url, "m-auto", {"cancelled", "completed"}, timeout=5)

    after = scrape(srv.base_url)
    route = "/v1/chat/completions"
    assert value(after, "qwen_http_requests_total", route=route, status="200") >= 4
    assert value(after, "qwen_http_requests_total", route="/v1/chat/completions/{session_id}", status="404") == 1
    assert value(after, "qwen_completion_tokens_total") >= 24
    assert value(after, "qwen_prompt_tokens_total") > 0
    assert value(after, "qwen_time_to_first_token_seconds_count") >= 4
    assert value(after, "qwen_time_per_output_token_seconds_count") >= 22
    assert value(after, "qwen_stream_resumes_total") == 1
    assert value(after, "qwen_cancellations_total", reason="manual") == 1
    assert value(after, "qwen_cancellations_total", reason="auto") == 1
    assert value(after, "qwen_live_sessions") == 4
    assert value(after, "qwen_listeners") == 0
    assert value(after, "qwen_queue_depth") == 0 and value(after, "qwen_running_generations") == 0


def test_metrics_use_route_templates_not_raw_paths(base_url):
    httpx.get(base_url + "/v1/chat/completions/abc-123")
    text = httpx.get(base_url + "/metrics").text
    assert "abc-123" not in text
    assert 'route="/v1/chat/completions/{session_id}"' in text
