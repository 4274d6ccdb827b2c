"""Admission: at most MAX_BATCH_SIZE running plus MAX_QUEUE waiting; beyond that a stream is
refused with 429 queue_full and Retry-After, the admitted ones complete, and every slot
is given back afterwards."""

import concurrent.futures

from helpers import HI, final_choice, long_request, metric, post, stream_events


def test_streams_beyond_running_plus_queue_get_429_and_admitted_ones_complete(make_server):
    srv = make_server(max_queue=1, max_batch_size=1)
    bodies = [long_request(max_tokens=500, session_id=f"load-{i}") for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda b: stream_events(srv.base_url, b), bodies))
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == 2 and statuses.count(429) == 3, statuses
    for headers, status, events in results:
        if status == 429:
            assert events[0]["error"]["code"] == "queue_full" and int(headers["retry-after"]) > 0
        else:
            assert final_choice(events)["finish_reason"] == "length"
    # no slot leaked: nothing admitted is left running or waiting
    assert metric(srv.base_url, "qwen_queue_depth") == 0 and metric(srv.base_url, "qwen_running_generations") == 0
    assert post(srv.base_url, {"messages": HI, "max_tokens": 2}).status_code == 200
