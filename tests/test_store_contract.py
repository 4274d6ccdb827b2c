"""The session-log contract (STYLE.md, "Seams"), one suite over every store: memory,
SQLite, Redis as its owner reads it, and Redis as another replica reads it.

append gives indexes 0, 1, 2...; read(after) gives exactly the visible events after
`after`, in order; follow(after) replays then follows live events across the seam until
[DONE]; finish records the outcome; an index no longer kept raises EventsGone, never a
silent gap."""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import Replica, until
from main import EventsGone, Outcome, SessionLog, SQLiteSessionLog, SQLiteWriter

STORES = ["memory", "sqlite", "redis", "redis-remote"]
DONE = "[DONE]"
COMPLETED = Outcome("completed", "stop", 3, 40)


class Store:
    """One backend: `log(key, capacity)` is the writer's log, `reader(log)` what a reader
    uses (the same log, or for redis-remote the session loaded on another replica)."""

    def __init__(self, kind: str, request, tmp_path):
        self.kind, self.request, self.tmp_path = kind, request, tmp_path
        self.owner = self.other = self.writer = None

    async def __aenter__(self) -> "Store":
        if self.kind == "sqlite":
            self.writer = SQLiteWriter(str(self.tmp_path / "sessions.db"), asyncio.get_running_loop())
        elif self.kind.startswith("redis"):
            url = self.request.getfixturevalue("redis_server").url
            self.owner = Replica(url, capacity=10_000)
            self.other = Replica(url) if self.kind == "redis-remote" else None
        return self

    async def __aexit__(self, *exc) -> None:
        for replica in (self.owner, self.other):
            if replica is not None:
                await replica.close()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)

    async def log(self, key: str, capacity: int = 10_000) -> SessionLog:
        if self.kind == "memory":
            return SessionLog(key, capacity)
        if self.kind == "sqlite":
            return SQLiteSessionLog(key, capacity, self.writer)
        self.owner.capacity = capacity
        return await self.owner.create(key)

    async def reader(self, log: SessionLog) -> SessionLog:
        if self.kind != "redis-remote":
            return log
        found = await self.other.sessions.load(log.session_id)
        assert found is not None
        return found[0]


def run(kind: str, request, tmp_path, body) -> None:
    async def main() -> None:
        async with Store(kind, request, tmp_path) as store:
            await body(store)

    asyncio.run(main())


def chunk(n: int) -> str:
    return json.dumps({"n": n})


async def settled(log: SessionLog) -> None:
    """Until the store acknowledged every append (readers see only those)."""
    await until(lambda: log.visible == log.next_index - 1, what="appends acknowledged")


async def write(log: SessionLog, count: int, start: int = 0, finish: bool = False) -> None:
    for n in range(start, start + count):
        assert log.append(chunk(n)) == n
        if n % 4 == 3:
            await asyncio.sleep(0)  # a delivery ends: the loop turns
    if finish:
        log.append(DONE)
        log.finish(COMPLETED)
    await asyncio.sleep(0)


@pytest.mark.parametrize("kind", STORES)
def test_append_indexes_from_zero_and_read_after_gives_exactly_the_later_events(kind, request, tmp_path):
    async def body(store: Store) -> None:
        log = await store.log(f"contract-read-{kind}")
        await write(log, 30)
        await settled(log)
        reader = await store.reader(log)
        for after in (-1, 0, 13, 28, 29):
            events = await reader.read(after)
            assert [e.index for e in events] == list(range(after + 1, 30))
            assert [e.data for e in events] == [chunk(n) for n in range(after + 1, 30)]

    run(kind, request, tmp_path, body)


@pytest.mark.parametrize("kind", STORES)
def test_follow_replays_then_follows_live_events_to_done_without_gap_or_duplicate(kind, request, tmp_path):
    async def body(store: Store) -> None:
        log = await store.log(f"contract-follow-{kind}")
        await write(log, 10)
        await settled(log)
        reader = await store.reader(log)

        async def follow(after: int) -> list:
            return [(e.index, e.data) async for e in reader.follow(after)]

        followers = [asyncio.ensure_future(follow(after)) for after in (-1, 4, 9)]
        await asyncio.sleep(0.05)
        await write(log, 40, start=10, finish=True)
        results = await asyncio.wait_for(asyncio.gather(*followers), 20)
        want = [(n, chunk(n)) for n in range(50)] + [(50, DONE)]
        for after, got in zip((-1, 4, 9), results):
            assert got == want[after + 1:]

    run(kind, request, tmp_path, body)


@pytest.mark.parametrize("kind", STORES)
def test_finish_records_the_outcome_and_the_log_drains(kind, request, tmp_path):
    async def body(store: Store) -> None:
        log = await store.log(f"contract-finish-{kind}")
        await write(log, 5, finish=True)
        await asyncio.wait_for(log.wait_drained(), 10)
        reader = await store.reader(log)
        await asyncio.wait_for(reader.wait_drained(), 10)
        assert reader.closed and reader.drained
        assert reader.outcome == COMPLETED
        assert [e.data for e in await reader.read(-1)][-1] == DONE

    run(kind, request, tmp_path, body)


@pytest.mark.parametrize("kind", STORES)
def test_an_index_no_longer_kept_is_gone_never_skipped(kind, request, tmp_path):
    """With room for 10 events and 300 written: every read either gives exactly the
    events after the cursor or raises EventsGone; the newest are always there; a store
    that keeps everything (SQLite) gives all."""
    async def body(store: Store) -> None:
        log = await store.log(f"contract-gone-{kind}", capacity=10)
        await write(log, 300)
        await settled(log)
        reader = await store.reader(log)
        gone = []
        for after in (-1, 50, 200, 280, 289, 295):
            try:
                events = await reader.read(after)
            except EventsGone:
                gone.append(after)
                continue
            assert [e.index for e in events] == list(range(after + 1, 300))
        if kind == "sqlite":
            assert gone == []
        else:
            assert -1 in gone and 295 not in gone and 289 not in gone

    run(kind, request, tmp_path, body)
