"""The Redis session store (issue #11, D60-D69) against a real redis-server: order, publish-after-ack,
reading and following from another replica, reservation, cancel, leases, outages, TTL and
trimming. Each Replica is one server replica (own clients and threads) on the test's loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from helpers import Replica, collect, deliver, stored
from helpers import until as wait_until
from main import (CANCEL_CHANNEL, REPLICA_LOST, EventsGone, Outcome, RedisSessionLog, RedisWriter, SessionExists,
                  StoreUnavailable, dumps, error_body, events_key, lease_key, listeners_key, session_key)

DONE = "[DONE]"
COMPLETED = Outcome("completed", "stop", 5, 7)


def chunk(n: int) -> str:
    return json.dumps({"n": n, "text": f"tok{n} é"})


async def generate(log: RedisSessionLog, count: int, per_delivery: int = 3, pause: float = 0.0,
                   outcome: Outcome = COMPLETED) -> list[str]:
    """What a shaper does: deltas in deliveries, then [DONE] and finish in the last one."""
    datas = [chunk(n) for n in range(count)]
    for start in range(0, count, per_delivery):
        await deliver(log, datas[start:start + per_delivery])
        if pause:
            await asyncio.sleep(pause)
    log.append(DONE)
    log.finish(outcome)
    await asyncio.sleep(0)
    return datas + [DONE]


def test_appends_keep_order_and_index_as_entry_id(redis_server):
    """Three sessions interleaved in every delivery: each stream holds its events once, in
    order, entry id 0-(index+1) with the index as a field, ended as completed."""
    async def run():
        a = Replica(redis_server.url)
        logs = [await a.create(f"order-{n}") for n in range(3)]
        want = [await asyncio.gather(*(generate(log, 50 + 7 * n, per_delivery=n + 1) for n, log in enumerate(logs)))]
        await asyncio.gather(*(log.wait_drained() for log in logs))
        await a.close()
        return want[0]

    want = asyncio.run(run())
    client = redis_server.client()
    for n, datas in enumerate(want):
        key = f"order-{n}"
        assert stored(client, key) == [(f"0-{i + 1}", i, d) for i, d in enumerate(datas)]
        h = client.hgetall(session_key(key))
        assert (h[b"status"], h[b"finish_reason"], h[b"last"]) == (b"completed", b"stop", str(len(datas) - 1).encode())


def test_readers_on_the_owner_see_only_events_redis_acknowledged(redis_server):
    """Publish-after-ack: while Redis holds writes (CLIENT PAUSE WRITE), appended events stay
    invisible to the owner's readers; each event a reader gets is already in the stream."""
    async def run():
        a = Replica(redis_server.url)
        log = await a.create("ack")
        await deliver(log, ["first"])
        await wait_until(lambda: log.visible == 0, what="first event acknowledged")
        admin = redis_server.client()
        admin.execute_command("CLIENT", "PAUSE", 600, "WRITE")
        paused = time.monotonic()
        await deliver(log, ["held-1", "held-2"])
        await asyncio.sleep(0.3)
        assert log.visible == 0 and await log.read(0) == []
        waited = await wait_until(lambda: log.visible == 2, what="held events acknowledged")
        assert time.monotonic() - paused >= 0.55 and waited > 0

        seen_before_stored = []

        async def reader():
            async for event in log.follow(-1):
                if not any(i == event.index for _, i, _ in stored(admin, "ack")):
                    seen_before_stored.append(event.index)

        task = asyncio.create_task(reader())
        await generate(log, 100, per_delivery=2)
        await asyncio.wait_for(task, 10)
        await a.close()
        return seen_before_stored

    assert asyncio.run(run()) == []


def test_another_replica_reads_after_a_cursor_and_follows_across_the_live_seam(redis_server):
    """B and C read a session A is still generating: read(after) gives exactly the stored
    events after the cursor; follow(after) replays then goes live with no gap and no
    duplicate at the seam, ends with [DONE], and the outcome is then the final one."""
    async def run():
        a, b, c = (Replica(redis_server.url) for _ in range(3))
        log = await a.create("seam", meta={"kind": "response", "input": [1, 2]})
        await deliver(log, [chunk(n) for n in range(40)])
        await wait_until(lambda: log.visible == 39)

        remote, meta = await b.sessions.load("seam")
        assert meta == {"kind": "response", "input": [1, 2]}
        assert (remote.visible, remote.oldest_kept, remote.closed) == (39, 0, False)
        assert [e.index for e in await remote.read(29)] == list(range(30, 40))
        assert await remote.read(39) == []

        remote_c, _ = await c.sessions.load("seam")
        followers = [asyncio.create_task(collect(remote.follow(-1))),
                     asyncio.create_task(collect(remote_c.follow(17)))]
        rest = await generate(log, 200, per_delivery=4, pause=0.002)
        got_b, got_c = await asyncio.wait_for(asyncio.gather(*followers), 20)
        outcome = remote.outcome
        for r in (a, b, c):
            await r.close()
        return got_b, got_c, rest, outcome

    got_b, got_c, rest, outcome = asyncio.run(run())
    want = [chunk(n) for n in range(40)] + rest
    assert [(e.index, e.data) for e in got_b] == list(enumerate(want))
    assert [(e.index, e.data) for e in got_c] == list(enumerate(want))[18:]
    assert outcome == COMPLETED


def test_two_replicas_racing_for_one_id_give_one_winner(redis_server):
    """Reservation is atomic (one script: EXISTS then HSET): for each of 30 ids both
    replicas try at once; exactly one wins, the other gets SessionExists (409)."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        results = []
        for n in range(30):
            results.append(await asyncio.gather(a.sessions.reserve(f"race-{n}"), b.sessions.reserve(f"race-{n}"),
                                                return_exceptions=True))
        owners = [(await a.sessions.info(f"race-{n}")).owner for n in range(30)]
        await a.close()
        await b.close()
        return a.rid, b.rid, results, owners

    rid_a, rid_b, results, owners = asyncio.run(run())
    for (ra, rb), owner in zip(results, owners):
        assert sorted([ra is None, rb is None]) == [False, True]
        loser = rb if ra is None else ra
        assert isinstance(loser, SessionExists)
        assert owner == (rid_a if ra is None else rid_b)


def test_a_finished_id_stays_taken(redis_server):
    """An id is used once (D13), across replicas: B cannot reserve what A finished."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        log = await a.create("once")
        await generate(log, 3)
        await log.wait_drained()
        with pytest.raises(SessionExists):
            await b.sessions.reserve("once")
        await a.close()
        await b.close()

    asyncio.run(run())


def test_cancel_from_another_replica_reaches_the_owner_within_a_step(redis_server):
    """B cancels a session A owns: pub/sub brings it to A's on_cancel in milliseconds (a
    decode step is ~3 ms on CPU with the tiny model, 15-50 ms with the real one)."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        await wait_until(a.agent.subscribed.is_set, what="A subscribed")
        latencies = []
        for n in range(20):
            await a.create(f"cancel-{n}")
            start = time.monotonic()
            assert await b.sessions.cancel(f"cancel-{n}") == "in_progress"
            await wait_until(lambda: f"cancel-{n}" in a.cancelled, timeout=5)
            latencies.append(a.cancelled[f"cancel-{n}"] - start)
        info = await b.sessions.info("cancel-0")
        assert await b.sessions.cancel("no-such-session") is None
        await a.close()
        await b.close()
        return sorted(latencies), info

    latencies, info = asyncio.run(run())
    assert info.cancel_requested
    assert latencies[len(latencies) // 2] < 0.02 and latencies[-1] < 0.1, latencies


def test_cancel_missed_by_pub_sub_still_reaches_the_owner(redis_server):
    """Pub/sub is at most once. A cancel published while A's subscription is down (killed
    by CLIENT KILL) is taken from A's owed-cancels set at its next beat; one that neither
    carries (written straight into the hash) comes back with A's next append."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        await wait_until(a.agent.subscribed.is_set, what="A subscribed")
        await a.create("missed")
        admin = redis_server.client()
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        start = time.monotonic()
        await b.sessions.cancel("missed")
        await wait_until(lambda: "missed" in a.cancelled, timeout=5, what="cancel via the owed set")
        via_set = a.cancelled["missed"] - start

        log = await a.create("in-hash")
        admin.hset(session_key("in-hash"), "cancel_requested", 1)
        start = time.monotonic()
        await deliver(log, ["token"])
        await wait_until(lambda: "in-hash" in a.cancelled, timeout=5, what="cancel via the append")
        via_append = a.cancelled["in-hash"] - start
        await a.close()
        await b.close()
        return via_set, via_append

    via_set, via_append = asyncio.run(run())
    assert via_set < 1.0  # beat 0.25 s, reconnection 0.25 s
    assert via_append < 0.05


def test_owner_lease_lapses_and_exactly_one_replica_closes_the_session(redis_server):
    """A dies mid-generation (its heartbeat stops). Once its lease is gone, three replicas
    close the session at once: one wins; the stream ends with the interrupted error and
    [DONE] once; a follower on B gets them; A's late writes are refused and A's own log
    ends with the same events at the same indexes."""
    async def run():
        a, b, c, d = (Replica(redis_server.url) for _ in range(4))
        log = await a.create("orphan")
        await deliver(log, [chunk(n) for n in range(10)])
        await wait_until(lambda: log.visible == 9)
        remote, _ = await b.sessions.load("orphan")
        follower = asyncio.create_task(collect(remote.follow(4)))
        a.crash()
        admin = redis_server.client()
        await wait_until(lambda: not admin.exists(lease_key(a.rid)), timeout=5, what="A's lease to lapse")
        wins = await asyncio.gather(*(r.sessions.close_interrupted("orphan") for r in (b, c, d)))
        got = await asyncio.wait_for(follower, 10)
        await deliver(log, ["zombie"])
        await wait_until(lambda: log.broken, what="A's log to end")
        local = await log.read(-1)
        for r in (a, b, c, d):
            await r.close()
        return wins, got, local, stored(admin, "orphan"), admin.hgetall(session_key("orphan")), remote.outcome

    wins, got, local, entries, h, outcome = asyncio.run(run())
    error = dumps(error_body(REPLICA_LOST, "server_error", code="interrupted"))
    assert sorted(wins) == [False, False, True]
    assert [d for _, _, d in entries] == [chunk(n) for n in range(10)] + [error, DONE]
    assert [(e.index, e.data) for e in got] == [(i, d) for _, i, d in entries][5:]
    assert [(e.index, e.data) for e in local] == [(i, d) for _, i, d in entries]
    assert h[b"status"] == b"interrupted" and outcome.status == "interrupted"
    assert json.loads(error)["error"]["code"] == "interrupted"


def test_a_follower_closes_the_orphan_it_waits_on(redis_server):
    """Nobody calls close_interrupted by hand: B's follower, blocked in XREAD, notices that
    A's lease lapsed and closes the session itself."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        log = await a.create("waiting")
        await deliver(log, ["x"])
        await wait_until(lambda: log.visible == 0)
        remote, _ = await b.sessions.load("waiting")
        follower = asyncio.create_task(collect(remote.follow(-1)))
        a.crash()
        got = await asyncio.wait_for(follower, 10)
        await a.close()
        await b.close()
        return got, remote.outcome

    got, outcome = asyncio.run(run())
    assert [e.data for e in got][0] == "x" and got[-1].data == DONE and len(got) == 3
    assert outcome.status == "interrupted"


def test_no_orphan_close_right_after_a_redis_restart(redis_server):
    """Leases do not survive a Redis restart without persistence, but their owners are alive:
    until Redis has been up one lease period, an absent lease proves nothing."""
    async def run():
        b = Replica(redis_server.url, lease=2.0, agent=False)
        admin = redis_server.client()
        admin.hset(session_key("young"), mapping={"status": "in_progress", "owner": "gone-replica", "last": -1,
                                                  "created": 0})
        early = await b.sessions.close_interrupted("young")
        await wait_until(lambda: int(admin.info("server")["uptime_in_seconds"]) >= 2, timeout=5)
        late = await b.sessions.close_interrupted("young")
        await b.close()
        return early, late

    redis_server.stop()
    redis_server.start()
    assert asyncio.run(run()) == (False, True)


def test_redis_restart_mid_stream_loses_reorders_and_duplicates_nothing(durable_redis, caplog):
    """kill -9 of a durable Redis while A streams, started again once A's readers have had 50
    events from memory (outage mode after degrade_after): the writer retries and logs the
    outage once; in the end Redis holds every index exactly once, in order; a follower on
    B rides out the restart, and a later reader on B gets the same events."""
    caplog.set_level(logging.INFO, logger="qwen3vl_server")

    async def run():
        a, b = Replica(durable_redis.url, degrade_after=0.3), Replica(durable_redis.url)
        log = await a.create("restart")
        local = asyncio.create_task(collect(log.follow(-1)))
        producer = asyncio.create_task(generate(log, 300, per_delivery=2, pause=0.01))
        await wait_until(lambda: log.visible >= 60, what="some events stored")
        remote_live, _ = await b.sessions.load("restart")
        live = asyncio.create_task(collect(remote_live.follow(10)))
        durable_redis.stop(kill=True)
        down_at = log.visible
        await wait_until(lambda: a.writer.unconfirmed, timeout=5, what="outage mode")
        await wait_until(lambda: log.visible > down_at + 50, timeout=10, what="local readers fed from memory")
        seen_while_down = log.visible
        durable_redis.start()
        want = await producer
        got_local = await asyncio.wait_for(local, 20)
        await log.wait_drained()
        await wait_until(lambda: a.writer.failing_since is None and not a.writer.unconfirmed, timeout=10)
        await wait_until(lambda: durable_redis.client().hget(session_key("restart"), "status") == b"completed",
                         timeout=10, what="the end stored")
        remote, _ = await b.sessions.load("restart")
        got_remote = await collect(remote.follow(-1))
        got_live = await asyncio.wait_for(live, 20)
        await wait_until(lambda: durable_redis.client().exists(lease_key(a.rid)) == 1, what="A's lease back")
        await a.close()
        await b.close()
        return want, got_local, got_remote, got_live, down_at, seen_while_down

    want, got_local, got_remote, got_live, down_at, seen_while_down = asyncio.run(run())
    assert seen_while_down > down_at + 50  # local readers kept streaming during the outage
    assert [(e.index, e.data) for e in got_local] == list(enumerate(want))
    assert [(e.index, e.data) for e in got_remote] == list(enumerate(want))
    assert [(e.index, e.data) for e in got_live] == list(enumerate(want))[11:]  # followed through the restart
    entries = stored(durable_redis.client(), "restart")
    assert entries == [(f"0-{i + 1}", i, d) for i, d in enumerate(want)]
    failing = [r for r in caplog.records if "redis writes failing" in r.getMessage()]
    recovered = [r for r in caplog.records if "redis writes work again" in r.getMessage()]
    assert len(failing) == 1 and len(recovered) == 1


def test_redis_losing_the_session_ends_it_early_and_says_so(redis_server):
    """A Redis restart without persistence loses the session: the writer's next append finds
    no hash, and A's log ends right after what its readers saw with the storage_failed error
    and [DONE] (never a silent gap); other replicas no longer find it (404)."""
    async def run():
        a, b = Replica(redis_server.url, degrade_after=None), Replica(redis_server.url)
        log = await a.create("lost")
        local = asyncio.create_task(collect(log.follow(-1)))
        await deliver(log, [chunk(n) for n in range(5)])
        await wait_until(lambda: log.visible == 4)
        redis_server.stop()
        redis_server.start()
        await deliver(log, [chunk(5)])
        got = await asyncio.wait_for(local, 10)
        found = await b.sessions.load("lost")
        await a.close()
        await b.close()
        return got, found, log.outcome

    got, found, outcome = asyncio.run(run())
    assert [e.index for e in got] == list(range(7))
    assert json.loads(got[5].data)["error"]["code"] == "storage_failed" and got[6].data == DONE
    assert found is None and outcome.status == "failed"


def test_every_key_of_a_session_gets_the_ttl_when_it_ends(redis_server):
    """While running, the orphan TTL (a day) bounds what a lost session leaves; at its end
    the hash, the stream and the listeners get SESSIONS_TTL_SECONDS, in the same script."""
    async def run():
        a, b = Replica(redis_server.url, ttl=120), Replica(redis_server.url)
        log = await a.create("ttl")
        await deliver(log, ["x"])
        await wait_until(lambda: log.visible == 0)
        await b.sessions.attach("ttl")
        admin = redis_server.client()
        running = [admin.pttl(k) for k in (session_key("ttl"), events_key("ttl"), listeners_key("ttl"))]
        log.append(DONE)
        log.finish(COMPLETED)
        await log.wait_drained()
        ended = [admin.pttl(k) for k in (session_key("ttl"), events_key("ttl"), listeners_key("ttl"))]
        await b.sessions.detach("ttl")
        after_detach = admin.pttl(listeners_key("ttl"))
        await a.close()
        await b.close()
        return running, ended, after_detach

    running, ended, after_detach = asyncio.run(run())
    assert all(ms > 3_600_000 for ms in running)  # the orphan TTL (a day) while it runs
    assert all(115_000 < ms <= 120_000 for ms in ended + [after_detach])


def test_a_cursor_that_fell_off_the_trimmed_stream_is_gone_never_a_gap(redis_server):
    """MAXLEN ~ capacity: a cursor older than what is kept gets EventsGone (410) from read
    and follow, and so does a follower that falls behind while following."""
    async def run():
        a, b = Replica(redis_server.url, capacity=10), Replica(redis_server.url, capacity=10)
        log = await a.create("trim")
        for start in range(0, 400, 20):
            await deliver(log, [chunk(n) for n in range(start, start + 20)])
        await wait_until(lambda: log.visible == 399)
        remote, _ = await b.sessions.load("trim")
        assert 0 < remote.oldest_kept <= 390
        with pytest.raises(EventsGone):
            await remote.read(5)
        with pytest.raises(EventsGone):
            await collect(remote.follow(5))
        with pytest.raises(EventsGone):
            await log.read(5)  # the owner: older than its ring, and than Redis
        assert [e.index for e in await remote.read(389)] == list(range(390, 400))

        slow = remote.follow(395)
        assert (await slow.__anext__()).index == 396
        for start in range(400, 800, 20):
            await deliver(log, [chunk(n) for n in range(start, start + 20)])
        await wait_until(lambda: log.visible == 799)
        with pytest.raises(EventsGone):
            async for _ in slow:
                pass
        await a.close()
        await b.close()

    asyncio.run(run())


def test_listeners_are_counted_across_live_replicas_only(redis_server):
    """B has two readers of A's session, C one: A counts 3. C dies (its lease lapses): 2.
    B's readers leave: 0, with the time since the last one left."""
    async def run():
        a, b, c = (Replica(redis_server.url) for _ in range(3))
        await a.create("listened")
        for replica in (b, b, c):
            await replica.sessions.attach("listened")
        three = await a.sessions.listeners("listened")
        c.crash()
        admin = redis_server.client()
        await wait_until(lambda: not admin.exists(lease_key(c.rid)), timeout=5)
        two = await a.sessions.listeners("listened")
        await b.sessions.detach("listened")
        await b.sessions.detach("listened")
        none = await a.sessions.listeners("listened")
        for r in (a, b, c):
            await r.close()
        return three, two, none

    three, two, none = asyncio.run(run())
    assert (three.live, three.idle_for) == (3, None)
    assert two.live == 2
    assert none.live == 0 and 0 <= none.idle_for < 1.0


def test_without_redis_operations_raise_store_unavailable_quickly(redis_server):
    """Redis down: every call that needs it raises StoreUnavailable (503) within seconds."""
    async def run():
        b = Replica(redis_server.url, agent=False)
        redis_server.stop()
        start = time.monotonic()
        for call in (b.sessions.reserve("x"), b.sessions.load("x"), b.sessions.cancel("x"),
                     b.sessions.listeners("x"), b.sessions.read_range("x", -1)):
            with pytest.raises(StoreUnavailable):
                await call
        took = time.monotonic() - start
        await b.close()
        return took

    assert asyncio.run(run()) < 5.0


def test_cancel_channel_carries_the_owner_and_the_key(redis_server):
    """The message format other tools (or an older replica) can rely on."""
    async def run():
        a, b = Replica(redis_server.url, agent=False), Replica(redis_server.url, agent=False)
        await a.create("fmt")
        sub = redis_server.client().pubsub()
        sub.subscribe(CANCEL_CHANNEL)
        sub.get_message(timeout=1)
        await b.sessions.cancel("fmt")
        message = sub.get_message(timeout=1)
        await a.close()
        await b.close()
        return a.rid, message

    rid, message = asyncio.run(run())
    assert json.loads(message["data"]) == {"owner": rid, "key": "fmt"}


class CountingWriter(RedisWriter):
    """A writer that notes how many sessions each pipeline carried."""

    def __init__(self, *args, **kwargs):
        self.pipelines: list[int] = []
        super().__init__(*args, **kwargs)

    def _pipeline(self, calls):
        self.pipelines.append(len(calls))
        return super()._pipeline(calls)


def test_one_pipeline_per_delivery_one_script_call_per_session(redis_server):
    """The appends of one loop iteration (one outbox delivery) reach Redis in one pipeline
    holding one EVALSHA per session, however many events each session got."""
    async def run():
        a = Replica(redis_server.url)
        a.writer.close()
        a.writer = CountingWriter(redis_server.url, asyncio.get_running_loop(), a.rid, ttl=60,
                                  on_cancel=lambda key: None)
        logs = [await a.create(f"pipe-{n}") for n in range(3)]
        for step in range(5):
            for n, log in enumerate(logs):
                for _ in range(n + 1):
                    log.append(chunk(step))
            await wait_until(lambda: all(log.visible == log.next_index - 1 for log in logs))
        pipelines = list(a.writer.pipelines)
        await a.close()
        return pipelines

    assert asyncio.run(run()) == [3] * 5


def test_a_session_redis_lost_part_of_ends_failed_there_too(redis_server):
    """Redis lost events it had acknowledged (here its stream is deleted; in life a Redis
    restarted from an AOF written every second): the next append would leave a gap, so the
    owner ends the session early, here and in Redis, never writing past the hole."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        log = await a.create("holed")
        await deliver(log, [chunk(n) for n in range(5)])
        await wait_until(lambda: log.visible == 4)
        redis_server.client().delete(events_key("holed"))
        await deliver(log, [chunk(5)])
        await wait_until(lambda: log.broken)
        local = await log.read(-1)
        remote, _ = await b.sessions.load("holed")
        await a.close()
        await b.close()
        return local, remote

    local, remote = asyncio.run(run())
    assert [json.loads(e.data)["error"]["code"] if e.index == 5 else e.data for e in local][5:] == [
        "storage_failed", DONE]
    assert remote.outcome.status == "failed" and remote.visible == 1  # error and [DONE] after what Redis kept


def test_writes_redis_refuses_end_the_session_and_close_it_there_once_they_pass(redis_server):
    """Redis out of memory (maxmemory, noeviction) refuses the appends: after RETRY_DELAYS
    the owner's log ends with storage_failed; once Redis takes writes again the session is
    closed there as failed too, so no reader elsewhere waits on it forever."""
    async def run():
        a, b = Replica(redis_server.url, degrade_after=None), Replica(redis_server.url)
        log = await a.create("oom")
        await deliver(log, ["before"])
        await wait_until(lambda: log.visible == 0)
        admin = redis_server.client()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        await deliver(log, ["refused"])
        await wait_until(lambda: log.broken, timeout=5, what="the log to end early")
        assert (await b.sessions.info("oom")).status == "in_progress"
        admin.config_set("maxmemory", 0)
        await wait_until(lambda: admin.hget(session_key("oom"), "status") == b"failed", timeout=5)
        local = [e.data for e in await log.read(-1)]
        remote = [e.data for e in await collect((await b.sessions.load("oom"))[0].follow(-1))]
        await a.close()
        await b.close()
        return local, remote

    local, remote = asyncio.run(run())
    assert local == remote and local[0] == "before" and local[-1] == DONE
    assert json.loads(local[1])["error"]["code"] == "storage_failed"


def test_garbage_on_the_cancel_channel_does_not_stop_the_lease(redis_server):
    """The agent thread keeps the lease: a message it cannot parse used to be able to kill
    it (and so, a lease later, every session it owned). Verified: it logs, goes on beating,
    and still delivers the next real cancel."""
    async def run():
        a, b = Replica(redis_server.url), Replica(redis_server.url)
        await wait_until(a.agent.subscribed.is_set)
        admin = redis_server.client()
        for junk in (b"not json", b"[1, 2]", b'{"owner": 1}'):
            admin.publish(CANCEL_CHANNEL, junk)
        await a.create("after-junk")
        await b.sessions.cancel("after-junk")
        await wait_until(lambda: "after-junk" in a.cancelled, timeout=2)
        await asyncio.sleep(1.5)  # past a lease period: it must still be there
        alive = await b.sessions.owner_alive(a.rid)
        await a.close()
        await b.close()
        return alive, a.agent.thread.is_alive()

    assert asyncio.run(run()) == (True, False)  # alive in Redis; thread stopped by close()
