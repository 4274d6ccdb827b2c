"""Fixtures only: one tiny real checkpoint per test session, and servers on 127.0.0.1.

Everything else the tests share (server classes, SSE reading, builders, polling) lives
in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import RedisServer, ServerFactory, ServerProcess


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """The main end-to-end server: `python main.py` with default settings."""
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.base_url


@pytest.fixture
def make_server(tiny_model_dir):
    """`make_server(**settings)`: an in-process server with these settings, closed after the test."""
    factory = ServerFactory(tiny_model_dir)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_module_server(tiny_model_dir):
    """Like `make_server`, for module-scoped fixtures: servers live until the module ends."""
    factory = ServerFactory(tiny_model_dir)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def strict(make_module_server):
    """A server with small limits so each one is cheap to hit; 127.0.0.2 is a private
    network it may fetch media from."""
    return make_module_server(max_request_bytes=200_000, max_image_pixels=100 * 100, max_images_per_request=2,
                              max_videos_per_request=1, max_video_bytes=60_000, max_video_seconds=1.0,
                              private_media_networks="127.0.0.2/32")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port, for one test (never a mock)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path):
    """A redis-server that writes every command to its AOF before answering, so a kill -9
    and a start on the same directory keep whatever it acknowledged."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()
