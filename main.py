"""OpenAI-compatible chat server for Qwen/Qwen3-VL-2B-Thinking on Hugging Face Transformers.

What it promises
- `POST /v1/chat/completions` takes OpenAI chat messages with text, images and videos and
  answers with a `chat.completion` or, with `stream: true`, SSE `chat.completion.chunk`
  events ending in `data: [DONE]`. The model's reasoning (everything before `</think>`)
  is `reasoning_content`; the answer after it is `content`.
- Generation never depends on a client being connected. Each request becomes a
  *session*: the generation worker writes events to the session's log, HTTP responses
  only read it. A client that drops reconnects with `Last-Event-ID` and misses nothing.

Invariants of a session log (tested)
- Event indexes start at 0 and increase by exactly 1; every SSE event carries
  `id: <session_id>:<index>`, `[DONE]` included, and `[DONE]` is the last event.
- A reader that resumes after index k gets exactly the events with index > k, in order,
  with no gap and no duplicate, also at the seam between replay and live events.
- With `PERSIST_SESSIONS=1` readers only see events already committed to SQLite, so a
  crash can never take back an event a client has seen; sessions that were generating
  when the process died are closed on restart as `interrupted`.
- An index older than anything still kept is refused (410), never skipped silently.

Generation: one thread runs a continuous-batching decode loop (never parallel threads:
two `generate` calls at once measured 2.7x slower on 2 cores). Up to MAX_BATCH_SIZE
requests decode together, each with its own sampling, seed, stops and cancel, and gets
the same tokens it would get alone; MAX_QUEUE more wait, the rest get 429. Cancel stops
a request within one decode step.

How to read this file: top to bottom, each section uses only what the sections above it
define (tests/test_structure.py checks it). Decisions cited as (D<n>) are in CLAUDE.md.
   settings      one Settings object, parsed and bounded once
   errors        the OpenAI error body; domain errors the engine and stores raise
   schemas       request bodies (pydantic)
   media         fetching (SSRF-safe), image and video decoding
   prompt        chat template, tokenizing, sampling parameters
   model         loading the model and processor
   text pipeline stop strings and the reasoning split
   metrics       Prometheus metrics
   engine        jobs, detokenizer, stopping, penalties, batch, decode loop, outbox
   event shapers chat chunks (GenerationSink) and the non-streamed body
   sessions      session logs (memory ring, SQLite), sessions, the registry
   http          SSE, request handling, routes, the error table
   middleware    pure ASGI: request ids, body limit, API keys, metrics
   app           lifespan, shutdown, create_app, __main__
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hmac
import io
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import anyio
import av
import httpx
import numpy as np
import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache
from transformers.video_utils import VideoMetadata

logger = logging.getLogger("qwen3vl_server")


# ----------------------------------------------------------------------------- settings

def comma_list(value: Any) -> Any:
    """`a, b,,c` from the environment as ["a", "b", "c"]; lists pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of the server; read once from the environment and `.env`, bounds checked."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(3000, ge=0, le=65535, description="Port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Python log level.")
    model_repo_id: str = Field("Qwen/Qwen3-VL-2B-Thinking", description="Hub model id or a local directory.")
    served_model_name: str = Field("", description="Model name reported by the API; empty means MODEL_REPO_ID.")
    hf_token: str = Field("", description="Hugging Face token for gated or private repos.")
    device_map: str = Field("auto", description="Transformers device_map; 'auto' uses the GPU when there is one.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
    preload_model: bool = Field(False, description="Load the model at startup instead of on the first request.")
    model_load_wait_seconds: float = Field(
        120.0, ge=0, description="How long a request waits for a loading model before 503.")
    max_tokens: int = Field(8192, ge=1, description="Default and upper bound of max_tokens per request.")
    temperature: float = Field(
        0.6, ge=0, le=2, description="Default sampling temperature (Qwen's advice for Thinking models).")
    top_p: float = Field(0.95, gt=0, le=1, description="Default nucleus sampling threshold.")
    top_k: int = Field(20, ge=0, description="Default top-k; 0 disables it.")
    max_video_frames: int = Field(16, ge=1, description="Frames sampled uniformly from each video, at most.")
    max_request_bytes: int = Field(
        20_000_000, ge=1024, description="Largest request body; larger ones get 413 unread.")
    max_image_bytes: int = Field(10_000_000, ge=1, description="Largest image, as a data URI or fetched.")
    max_image_pixels: int = Field(
        36_000_000, ge=1, description="Most pixels in an image or video frame (checked before decoding).")
    max_images_per_request: int = Field(8, ge=0, description="Most images in one request.")
    max_video_bytes: int = Field(50_000_000, ge=1, description="Largest video, as a data URI or fetched.")
    max_video_seconds: float = Field(600.0, gt=0, description="Longest video accepted.")
    max_video_decoded_frames: int = Field(
        36_000, ge=1, description="Most frames a video may hold (all are demuxed).")
    max_videos_per_request: int = Field(2, ge=0, description="Most videos in one request.")
    media_fetch_timeout_seconds: float = Field(
        10.0, gt=0, description="Connect/read timeout when fetching media URLs.")
    allow_private_media: bool = Field(False, description="Allow media URLs on loopback/private/link-local addresses.")
    private_media_networks: Annotated[tuple[Any, ...], NoDecode] = Field(
        (), description="Comma list of CIDRs exempt from the private-address block.")
    allowed_media_domains: CommaList = Field(
        [], description="Comma list of domains media URLs must be on; empty allows all.")
    allowed_local_media_path: str = Field(
        "", description="Directory whose files may be named as media; empty refuses paths.")
    api_key: CommaList = Field(
        [], description="Bearer key, or a comma list of keys, required on /v1 routes; empty disables.")
    cors_allow_origins: CommaList = Field([], description="Comma list of origins allowed by CORS; empty disables CORS.")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Generations decoded together (continuous batching); 1 = one at a time.")
    max_prefill_tokens_per_step: int = Field(
        2048, ge=1, description="Prompt tokens prefilled between two decode steps (a longer prompt runs alone).")
    max_queue: int = Field(16, ge=0, description="Generations that may wait behind the running ones; more get 429.")
    generation_timeout_seconds: float = Field(
        600.0, ge=0, description="Longest one generation may decode; 0 disables.")
    context_overflow: Literal["error", "truncate"] = Field(
        "error", description="Prompt over the context: error (400) or truncate (drop the oldest non-system turns).")
    session_buffer_events: int = Field(
        0, ge=0, description="Events kept in memory per session; 0 means MAX_TOKENS + 16.")
    max_sessions: int = Field(
        256, ge=1, description="Sessions kept in memory; the oldest finished ones are dropped first.")
    sessions_ttl_seconds: float = Field(
        3600.0, gt=0, description="Finished sessions are deleted this long after they end.")
    persist_sessions: bool = Field(False, description="Write sessions to SQLite so streams replay after a restart.")
    sessions_db_path: str = Field("data/sessions.db", description="SQLite file used when PERSIST_SESSIONS=1.")
    cancel_after_disconnect_seconds: float = Field(
        3600.0, ge=0, description="Cancel a generation nobody has listened to for this long; 0 disables.")
    stream_interval_ms: float = Field(
        10.0, ge=0, description="Least time between two deliveries of new tokens to streams; 0 sends every step.")
    sse_ping_seconds: float = Field(15.0, gt=0, description="Interval of SSE keep-alive comments.")
    sse_send_timeout_seconds: float = Field(
        30.0, gt=0, description="A client that accepts no bytes this long is dropped.")
    media_fetch_deadline_seconds: float = Field(
        30.0, gt=0, description="Longest one media URL fetch may take in all: DNS, redirects and a slow body.")
    media_decode_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest a request's media may take to decode; then 413 media_decode_timeout.")
    max_image_tokens: int = Field(
        1024, ge=1, description="Vision tokens one image may become; larger images are scaled down to fit.")
    max_video_tokens: int = Field(
        4096, ge=1, description="Vision tokens one video may become, all its frames together; frames are scaled down.")
    max_messages: int = Field(
        1024, ge=1, description="Most messages in one request, each content part of a message counted as one.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("allowed_media_domains", "api_key", "cors_allow_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("private_media_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> tuple:
        try:
            return tuple(ipaddress.ip_network(str(n), strict=False) for n in comma_list(value))
        except ValueError as exc:
            raise ValueError(f"PRIVATE_MEDIA_NETWORKS: {exc}") from None

    @field_validator("allowed_media_domains", mode="after")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [d.lower().lstrip(".") for d in value]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_repo_id

    @property
    def buffer_events(self) -> int:
        return self.session_buffer_events or self.max_tokens + 16


# ----------------------------------------------------------------------------- errors

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """Bad input, in OpenAI's shape, with its HTTP status (400, 413...): raised while a
    request is read and checked. What the engine and stores refuse is a DomainError."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def invalid(message: str, param: str | None, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None, code: str) -> APIError:
    return APIError(413, message, param=param, code=code)


class DomainError(Exception):
    """A refusal of the engine, a store or the session layer. The HTTP section's
    ERROR_TABLE maps each class to its status, type and code; the engine knows no HTTP."""

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after


class QueueFull(DomainError):
    """Running plus waiting generations are at MAX_BATCH_SIZE + MAX_QUEUE."""


class TooManySessions(DomainError):
    """MAX_SESSIONS are held and none of them has finished."""


class ModelLoading(DomainError):
    """The model is still loading after MODEL_LOAD_WAIT_SECONDS."""


class ModelLoadFailed(DomainError):
    """The last load failed; the next try comes after retry_after seconds."""


class ShuttingDown(DomainError):
    """The server is stopping and admits no new generation."""


class SessionExists(DomainError):
    """A request named a session id that is already taken."""


class SessionNotFound(DomainError):
    """No session with that id (never created, expired, or deleted)."""


class EventsGone(DomainError):
    """The asked-for events are no longer kept."""


class GenerationFailed(DomainError):
    """The generation ended with an error (reported to a non-streamed caller)."""



# ----------------------------------------------------------------------------- schemas

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MediaURL(BaseModel):
    """`{"url": ...}`, or the bare URL string some clients send."""

    url: str
    detail: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_string(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = TextPart | ImagePart | VideoPart


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request body plus vLLM's min_tokens/ignore_eos and our session_id."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    session_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    # Known OpenAI fields this server cannot honour yet: refused, never ignored.
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and any(not -100 <= b <= 100 or t < 0 for t, b in value.items()):
            raise ValueError("logit_bias maps token ids to values between -100 and 100")
        return value

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """A known field we cannot honour is a 400 naming it, never silently ignored."""
    if req.n != 1:
        raise invalid("Only n=1 is supported.", "n", "unsupported_parameter")
    for name in ("tools", "functions", "logprobs", "top_logprobs"):
        if getattr(req, name):
            raise invalid(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    if req.tool_choice not in (None, "none"):
        raise invalid("'tool_choice' is not supported by this server.", "tool_choice", "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise invalid("Only response_format type 'text' is supported.", "response_format", "unsupported_parameter")
    for i, message in enumerate(req.messages):
        if message.role == "user" and not message.content:
            raise invalid("User messages need content.", f"messages.{i}.content", "invalid_value")


def validate_request(body: dict) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise invalid(f"{param}: {first['msg']}", param, "invalid_value") from None



# ----------------------------------------------------------------------------- media

ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
DATA_URI_HEADER = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64$")
MAX_REDIRECTS = 3
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}  # what an MP4/MOV file starts with
NO_PROTOCOLS = {"protocol_whitelist": "none"}  # FFmpeg may open no URL from inside a file
# Qwen's smart_resize raises above 200:1 (a 500 before #15); its video path first scales a
# side under 32 px up to 32 with truncation, which can stretch a ratio by 32/31.
MAX_ASPECT_RATIO = 190
SEEKS_BY_DTS = {"mpegts"}  # demuxers whose seeks search decode times; MP4, MKV and AVI seek by pts
FRAME_LIST_FPS = 1.0  # frame-list videos carry no timing; vLLM assumes 1 frame a second too
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# Ranges Python's ipaddress calls global that still reach private hosts: IPv6 site-local,
# the 6to4 relay anycast, and local-use NAT64 (RFC 8215), whose IPv4 side is anyone's.
NOT_PUBLIC_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("fec0::/10", "192.88.99.0/24", "64:ff9b:1::/48"))


def check_media_counts(req: ChatCompletionRequest, settings: Settings) -> None:
    """Refuse too many media parts before anything is fetched or decoded."""
    parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content]
    images = sum(isinstance(p, ImagePart) for p in parts)
    videos = sum(isinstance(p, VideoPart) for p in parts)
    if images > settings.max_images_per_request:  # 400, not 413: a count of parts, as clients expect (#15)
        raise invalid(f"At most {settings.max_images_per_request} images per request.", "messages", "too_many_images")
    if videos > settings.max_videos_per_request:
        raise invalid(f"At most {settings.max_videos_per_request} videos per request.", "messages", "too_many_videos")


async def fetch_media(url: str, settings: Settings, param: str, limit: int) -> bytes:
    """Bytes behind a data URI, an allowed local path, or an http(s) URL on a public address."""
    if url.startswith("data:"):
        data = decode_data_uri(url, param)
        if len(data) > limit:
            raise too_large(f"Media is larger than {limit} bytes.", param, "media_too_large")
        return data
    if url.startswith(("http://", "https://")):
        return await fetch_http(url, settings, param, limit)
    if settings.allowed_local_media_path:
        return await asyncio.to_thread(read_local_media, url, settings.allowed_local_media_path, param, limit)
    raise invalid("Media URLs must be http(s) URLs or data URIs.", param, "invalid_media_url")


def decode_data_uri(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")  # only the short header goes through the regex
    if not comma or not DATA_URI_HEADER.match(header):
        raise invalid("Data URIs must be base64 encoded: data:<mime>;base64,<data>.", param, "invalid_data_uri")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("The data URI holds invalid base64.", param, "invalid_data_uri") from None


def read_local_media(url: str, root: str, param: str, limit: int) -> bytes:
    """A file under ALLOWED_LOCAL_MEDIA_PATH (symlinks resolved before the check)."""
    path = os.path.realpath(url.removeprefix("file://"))
    base = os.path.realpath(root)
    if os.path.commonpath([path, base]) != base or not os.path.isfile(path):
        raise invalid("Local media must be a file under the allowed media path.", param, "invalid_media_url")
    if os.path.getsize(path) > limit:
        raise too_large(f"Media is larger than {limit} bytes.", param, "media_too_large")
    with open(path, "rb") as f:
        return f.read()


async def fetch_http(url: str, settings: Settings, param: str, limit: int) -> bytes:
    """fetch_hops under one deadline: per-read timeouts alone let a server that drips a byte
    a second hold a fetch for as long as it likes (24.6 s past a 2 s timeout in #15)."""
    try:
        async with asyncio.timeout(settings.media_fetch_deadline_seconds):
            return await fetch_hops(url, settings, param, limit)
    except TimeoutError:
        raise invalid(f"Fetching media took longer than {settings.media_fetch_deadline_seconds:g} s.", param,
                      "media_fetch_timeout") from None


async def fetch_hops(url: str, settings: Settings, param: str, limit: int) -> bytes:
    """GET with timeouts and a streamed byte cap, re-checking the address of every redirect hop.

    Each hop connects to the very address that was checked (the Host header and TLS SNI
    keep the name), so a DNS answer that changes between check and connect cannot
    reach a private address.
    """
    timeout = httpx.Timeout(settings.media_fetch_timeout_seconds)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host, host_header = await pin_address(url, settings, param)
            try:
                async with client.stream("GET", pinned, headers={"Host": host_header},
                                         extensions={"sni_hostname": host}) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = redirect_target(url, response.headers["location"], param)
                        continue
                    if response.status_code != 200:
                        raise invalid(f"Fetching media failed with HTTP {response.status_code}.", param,
                                      "media_fetch_failed")
                    return await read_capped(response, limit, param)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise invalid(f"Fetching media failed: {type(exc).__name__}.", param, "media_fetch_failed") from None
    raise invalid("Too many redirects while fetching media.", param, "media_fetch_failed")


def redirect_target(url: str, location: str, param: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:
        raise invalid("Fetching media failed: a malformed redirect.", param, "media_fetch_failed") from None


def split_media_url(url: str, param: str) -> tuple[Any, str, int]:
    """(parts, ASCII host, port) of an http(s) URL. The host is IDNA-encoded here, so the
    allow-list, DNS and the Host header all see the one name that gets resolved."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a bad port, an unbalanced '[', a netloc NFKC changes, a bad IDN label: 500s before #15
        raise invalid("The media URL is malformed.", param, "invalid_media_url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise invalid("Media URLs must be http(s) URLs or data URIs.", param, "invalid_media_url")
    return parts, host, port


async def pin_address(url: str, settings: Settings, param: str) -> tuple[str, str, str]:
    """(URL rewritten to a checked IP address, host name, Host header) or a 400."""
    parts, host, port = split_media_url(url, param)
    if not domain_allowed(host, settings.allowed_media_domains):
        raise invalid(f"Media host '{host}' is not in the allowed domains.", param, "media_url_forbidden")
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                                       settings.media_fetch_timeout_seconds)
    except (socket.gaierror, UnicodeError, TimeoutError):
        raise invalid(f"Media host '{host}' does not resolve.", param, "media_fetch_failed") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(address_allowed(a, settings) for a in addresses):
        raise invalid("Media URLs may not point at private, loopback or reserved addresses.", param,
                      "media_url_forbidden")
    ip = addresses[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    named = f"[{host}]" if ":" in host else host
    return (urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host,
            f"{named}:{parts.port}" if parts.port else named)


def domain_allowed(host: str, domains: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> bool:
    """Public, or exempted; an IPv6 address that carries an IPv4 one must pass for both (#15)."""
    if settings.allow_private_media:
        return True
    return all(any(a in net for net in settings.private_media_networks) or address_public(a)
               for a in addresses_reached(ip))


def addresses_reached(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The address itself and every IPv4 address it embeds. A translated address
    (IPv4-mapped, NAT64 64:ff9b::/96) stands for its IPv4 host alone; a tunnel address
    (6to4 2002::/16, Teredo) reaches its relay and its IPv4 host, so both are checked."""
    if ip.version == 4:
        return [ip]
    if ip.ipv4_mapped or ip in NAT64_PREFIX:
        return [ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return [ip, *([ip.sixtofour] if ip.sixtofour else []), *(ip.teredo or ())]


def address_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if any(ip in net for net in NOT_PUBLIC_NETWORKS):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback)


async def read_capped(response: httpx.Response, limit: int, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"Media is larger than {limit} bytes.", param, "media_too_large")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise too_large(f"Media is larger than {limit} bytes.", param, "media_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class DecodeBudget:
    """How long a request's media may take to decode, and its cancel flag. Checked between
    media, packets and frames, the points where decoding can stop: one long video held a
    worker for minutes before #15, whether or not anyone still waited for the answer."""

    seconds: float
    cancel: threading.Event
    image_pixels: int = 0  # what the processor will scale an image down to (0: no scaling here)
    video_pixels: int = 0  # ... and a video, all its sampled frames together
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def check(self, param: str) -> None:
        if self.cancel.is_set():
            raise APIError(409, "The request was cancelled while its media was decoded.", param=param,
                           code="cancelled")
        if time.monotonic() > self.deadline:
            raise too_large(f"Decoding the media took longer than {self.seconds:g} s.", param, "media_decode_timeout")


def check_frame_shape(width: int, height: int, max_pixels: int, param: str, kind: Literal["image", "video"]):
    """Over the pixel cap is 413; a shape the vision tower cannot take is 400 (a 500 before #15)."""
    noun = "Images" if kind == "image" else "Video frames"
    if width * height > max_pixels:
        raise too_large(f"{noun} may have at most {max_pixels} pixels.", param, f"{kind}_too_large")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise invalid(f"{noun} may be at most {MAX_ASPECT_RATIO} times as long as they are wide.", param,
                      f"invalid_{kind}")


def check_stackable(frames: list[np.ndarray], frame: np.ndarray, param: str) -> None:
    """Sampled frames are stacked into one array: a stream whose resolution changes is
    refused (np.stack raised, a 500, before #15)."""
    if frames and frames[0].shape != frame.shape:
        raise invalid("The video changes resolution mid-stream.", param, "invalid_video")


def shrink_factor(width: int, height: int, target: int) -> float:
    """How many times smaller each side may get while keeping twice `target` pixels; the
    processor's resize makes the exact fit from there. Scaling here first keeps a 6000x6000
    image from reaching the processor as a 430 MB float tensor. Below 2, not worth it. The
    short side stays at least 32 px (one vision token's side), so rounding it moves the
    aspect ratio checked before by at most 32/31."""
    factor = min((width * height / (2 * target)) ** 0.5, min(width, height) / 32) if target else 1.0
    return factor if factor >= 2 else 1.0


def decode_image(data: bytes, param: str, *, max_pixels: int, target: int, kind: Literal["image", "video"] = "image"):
    """An RGB PIL image, scaled down by a whole factor towards `target` pixels; the pixel
    count is checked from the header, before decoding. As a frame of a frame-list video
    (kind "video"), its refusals carry the video codes."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ALLOWED_IMAGE_FORMATS:
            raise invalid(f"Image format {image.format} is not supported.", param, f"invalid_{kind}")
        check_frame_shape(image.width, image.height, max_pixels, param, kind)
        factor = shrink_factor(image.width, image.height, target)
        if factor > 1:  # JPEG decodes straight to 1/2..1/8 scale; other formats ignore the draft
            image.draft("RGB", (int(image.width / factor), int(image.height / factor)))
        image = image.convert("RGB")
        factor = int(shrink_factor(image.width, image.height, target))
        return image.reduce(factor) if factor > 1 else image
    except Image.DecompressionBombError:
        raise too_large(f"Images may have at most {max_pixels} pixels.", param, f"{kind}_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise invalid(f"The image could not be decoded ({type(exc).__name__}).", param, f"invalid_{kind}") from None


def split_frame_list(url: str, settings: Settings, param: str) -> list[str]:
    """The base64 frames of vLLM's frame-list video, `data:video/jpeg;base64,<jpeg>,<jpeg>,...`
    (refused as bad base64 before #15); only the sampled ones are ever decoded."""
    header, _, payload = url.partition(",")
    if not DATA_URI_HEADER.match(header):
        raise invalid("Data URIs must be base64 encoded: data:<mime>;base64,<data>.", param, "invalid_data_uri")
    if len(payload) // 4 * 3 > settings.max_video_bytes:
        raise too_large(f"Media is larger than {settings.max_video_bytes} bytes.", param, "media_too_large")
    if payload.count(",") >= settings.max_video_decoded_frames:
        raise too_large(f"Videos may hold at most {settings.max_video_decoded_frames} frames.", param,
                        "video_too_large")
    return payload.split(",")


def decode_frame_list(chunks: list[str], settings: Settings, param: str, budget: DecodeBudget):
    """A frame-list video sampled like any other: (frames, metadata). The list carries no
    timing; FRAME_LIST_FPS stands in for it, and MAX_VIDEO_SECONDS does not apply."""
    frames, indices = [], sample_positions(len(chunks), settings)
    target = budget.video_pixels // max(2, len(indices))
    for i in indices:
        budget.check(param)
        try:
            data = base64.b64decode(chunks[i], validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"Frame {i} of the video holds invalid base64.", param, "invalid_data_uri") from None
        frame = np.asarray(decode_image(data, param, max_pixels=settings.max_image_pixels, target=target, kind="video"))
        check_stackable(frames, frame, param)
        frames.append(frame)
    return sampled_video(frames, indices, len(chunks), FRAME_LIST_FPS, "jpeg_sequence", param)


def sample_positions(total: int, settings: Settings) -> list[int]:
    """At most MAX_VIDEO_FRAMES positions spread evenly over `total` frames, first and last included."""
    return np.unique(np.linspace(0, total - 1, min(settings.max_video_frames, total)).round()).astype(int).tolist()


def sampled_video(frames: list, indices: list[int], total: int, fps: float, backend: str, param: str):
    """(frames stacked [t, h, w, 3], metadata naming where each came from)."""
    if not frames:
        raise invalid("The video holds no decodable frames.", param, "invalid_video")
    if len(frames) == 1:  # the vision tower groups frames in pairs
        frames, indices = frames * 2, indices * 2
    height, width = frames[0].shape[:2]
    meta = VideoMetadata(total_num_frames=total, fps=fps, width=width, height=height, duration=total / fps,
                         video_backend=backend, frames_indices=np.array(indices))
    return np.stack(frames), meta


def decode_video(data: bytes, settings: Settings, param: str, budget: DecodeBudget):
    """Uniformly sample at most MAX_VIDEO_FRAMES RGB frames with PyAV; returns (frames, metadata)."""
    try:
        index = index_video(data, settings, param, budget)
        frames, indices = read_frames(data, index, sample_positions(index.total, settings), settings, param, budget)
    except (av.FFmpegError, IndexError, ValueError, OSError, ZeroDivisionError) as exc:
        raise invalid(f"The video could not be decoded ({type(exc).__name__}).", param, "invalid_video") from None
    return sampled_video(frames, indices, index.total, index.fps, "pyav", param)


def video_demuxer(data: bytes) -> str | None:
    """The FFmpeg demuxer for a container we accept, from its magic bytes; None for anything else."""
    if data[4:8] in MP4_BOXES:
        return "mov"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also WebM
    if data.startswith(b"RIFF") and data[8:12] == b"AVI ":
        return "avi"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) > 376 and data[0] == data[188] == data[376] == 0x47:
        return "mpegts"
    return None


def open_video(data: bytes, param: str):
    """A container over the bytes in memory, with its demuxer named, never probed.

    Probing lets FFmpeg pick any of its demuxers, and some open URLs named inside the
    file: a few hundred bytes of SDP made it bind UDP ports and wait 19 s (#15); HLS and
    concat lists can name http:// or file:// inputs. A protocol whitelist that names no
    protocol is the second lock: no demuxer may open anything beyond the given bytes.
    """
    demuxer = video_demuxer(data)
    if demuxer is None:
        raise invalid("Videos must be MP4/MOV, WebM/MKV, AVI, GIF or MPEG-TS.", param, "invalid_video")
    return av.open(io.BytesIO(data), format=demuxer, container_options=NO_PROTOCOLS, metadata_errors="ignore")


@dataclass
class VideoIndex:
    """What demuxing (no decoding) tells of a video stream: its frames and rate, and where
    its frames and keyframes lie, in the stream's time base."""

    total: int
    fps: float
    pts: np.ndarray  # [total]: presentation times, sorted; empty when some packet has none
    keyframes: np.ndarray  # [k, 2]: each keyframe's (pts, timestamp a seek to it names), sorted by pts

    def keyframe_before(self, target: int) -> tuple[int, int] | None:
        """(pts, seek timestamp) of the last keyframe at or before pts `target`."""
        at = int(np.searchsorted(self.keyframes[:, 0], target, side="right")) - 1
        return (int(self.keyframes[at, 0]), int(self.keyframes[at, 1])) if at >= 0 else None


def index_video(data: bytes, settings: Settings, param: str, budget: DecodeBudget) -> VideoIndex:
    """Demux every packet (cheap next to decoding) to count frames and find keyframes,
    refusing oversize videos before any frame is decoded."""
    with open_video(data, param) as container:
        stream = video_stream(container, settings, param)
        fps = float(stream.average_rate or 24)
        by_dts = container.format.name in SEEKS_BY_DTS
        pts, keyframes = [], []
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if len(pts) % 256 == 0:
                budget.check(param)
            pts.append(packet.pts)
            if len(pts) > settings.max_video_decoded_frames:
                break
            if packet.is_keyframe and packet.pts is not None:
                keyframes.append((packet.pts, packet.dts if by_dts and packet.dts is not None else packet.pts))
    if len(pts) / fps > settings.max_video_seconds or len(pts) > settings.max_video_decoded_frames:
        raise too_large(f"Videos may last at most {settings.max_video_seconds:g} s and "
                        f"{settings.max_video_decoded_frames} frames.", param, "video_too_large")
    if not pts:
        raise invalid("The video holds no frames.", param, "invalid_video")
    timed = None not in pts
    return VideoIndex(len(pts), fps, np.sort(np.array(pts if timed else [], dtype=np.int64)),
                      np.array(sorted(keyframes) if timed else [], dtype=np.int64).reshape(-1, 2))


def video_stream(container, settings: Settings, param: str):
    """The first video stream, if FFmpeg can decode it and its frames are within limits."""
    if not container.streams.video:
        raise invalid("The file holds no video stream.", param, "invalid_video")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec FFmpeg does not know (AttributeError, a 500, before #15)
        raise invalid("The video's codec is not supported.", param, "invalid_video")
    check_frame_shape(stream.codec_context.width, stream.codec_context.height, settings.max_image_pixels, param,
                      "video")
    return stream


def read_frames(data: bytes, index: VideoIndex, wanted: list[int], settings: Settings, param: str,
                budget: DecodeBudget) -> tuple[list, list[int]]:
    """The wanted frames (by position in presentation order) as RGB arrays, decoding only
    from the keyframe before each: decoding every frame cost ~7.3 ms a 1080p frame, so a
    36,000-frame video held a worker ~4 minutes to keep 16 (#15)."""
    try:
        return read_frames_from(data, index, wanted, settings, param, budget, seek=True)
    except SeekMissed:  # a seek landed past the frame (a demuxer that seeks by estimate): read through
        return read_frames_from(data, index, wanted, settings, param, budget, seek=False)


class SeekMissed(Exception):
    """A seek landed after the frame it was meant to reach."""


def read_frames_from(data: bytes, index: VideoIndex, wanted: list[int], settings: Settings, param: str,
                     budget: DecodeBudget, seek: bool) -> tuple[list, list[int]]:
    frames, indices, target = [], [], budget.video_pixels // max(2, len(wanted))
    with open_video(data, param) as container:
        cursor = FrameCursor(container, container.streams.video[0], partial(budget.check, param))
        for i in wanted:
            frame = cursor.frame(index, i, seek)
            if frame is None:
                break
            check_frame_shape(frame.width, frame.height, settings.max_image_pixels, param, "video")
            frames.append(rgb_frame(frame, target))
            check_stackable(frames[:-1], frames[-1], param)
            indices.append(i)
        logger.debug("video: kept %d of %d frames, decoded %d", len(frames), index.total, cursor.decoded)
    return frames, indices


def rgb_frame(frame: av.VideoFrame, target: int) -> np.ndarray:
    """The frame as [h, w, 3] RGB, scaled by FFmpeg towards `target` pixels (see shrink_factor)."""
    factor = shrink_factor(frame.width, frame.height, target)
    if factor == 1:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=max(1, round(frame.width / factor)),
                            height=max(1, round(frame.height / factor)), interpolation="AREA")


class FrameCursor:
    """Decodes one stream forward, and seeks ahead when a keyframe lies between the last
    decoded frame and the next wanted one (then only that GOP's frames are decoded)."""

    def __init__(self, container, stream, check: Callable[[], None]):
        self.container, self.stream, self.check = container, stream, check
        self.frames = container.decode(stream)
        self.last_pts: float = float("-inf")
        self.decoded = 0

    def frame(self, index: VideoIndex, position: int, seek: bool) -> av.VideoFrame | None:
        """The frame at `position` in presentation order, or None past the end."""
        if not index.pts.size:  # no timestamps: count frames in decode order
            return self.frame_number(position)
        target = int(index.pts[position])
        return self.frame_at(target, index.keyframe_before(target) if seek else None)

    def frame_at(self, target: int, keyframe: tuple[int, int] | None) -> av.VideoFrame | None:
        """The first frame at or after pts `target`; seeking first to `keyframe` if it is ahead."""
        seeked = keyframe is not None and keyframe[0] > self.last_pts
        if seeked:
            self.container.seek(keyframe[1], stream=self.stream, backward=True)
            self.frames = self.container.decode(self.stream)
        for frame in self.frames:
            self.check()
            self.decoded += 1
            if seeked and frame.pts is not None and frame.pts > target:
                raise SeekMissed()
            seeked = False
            self.last_pts = frame.pts if frame.pts is not None else self.last_pts
            if frame.pts is None or frame.pts >= target:
                return frame
        return None

    def frame_number(self, number: int) -> av.VideoFrame | None:
        """Frame `number` in decode order (for containers without timestamps)."""
        for frame in self.frames:
            self.check()
            self.decoded += 1
            if self.decoded > number:
                return frame
        return None


@lru_cache(maxsize=1)
def media_pool() -> ThreadPoolExecutor:
    """Threads for requests with media: decoding, then the processor's resizing and patching.
    Text-only requests are tokenized in a pool of their own, so they never wait behind a
    video (#15).

    Each thread is limited to one torch thread: a thread that runs torch ops gets its own
    OpenMP team; left at the default size, those teams fight the decode loop's for the
    same cores (measured: decode steps 2.9 -> 3.8 ms after one image was preprocessed in
    asyncio's default executor).
    """
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="media", initializer=torch.set_num_threads,
                              initargs=(1,))


@dataclass
class PromptMessage:
    """One message ready for the chat template, with the media its placeholders stand for."""

    role: str
    content: str | list[dict]
    fetched: list[tuple[str, Any, str]] = field(default_factory=list)  # (kind, bytes or frame list, param)
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_metadata: list = field(default_factory=list)

    def decode(self, settings: Settings, budget: DecodeBudget) -> None:
        """Fetched bytes to PIL images and sampled video frames (blocking; preprocessing pool)."""
        for kind, data, param in self.fetched:
            budget.check(param)
            if kind == "image":
                self.images.append(decode_image(data, param, max_pixels=settings.max_image_pixels,
                                                target=budget.image_pixels))
            else:
                decode = decode_frame_list if kind == "frames" else decode_video
                frames, meta = decode(data, settings, param, budget)
                self.videos.append(frames)
                self.video_metadata.append(meta)
        self.fetched = []



async def load_media(messages: list[tuple[int, Message]], settings: Settings) -> list[PromptMessage]:
    """Messages (with their index in the request) with their media fetched, not yet decoded,
    and replaced by template placeholders."""
    out = []
    for i, message in messages:
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            out.append(PromptMessage(role, message.content or ""))
            continue
        prompt = PromptMessage(role, [])
        for j, part in enumerate(message.content):
            await load_part(part, prompt, settings, f"messages.{i}.content.{j}")
        out.append(prompt)
    return out


async def load_part(part: ContentPart, prompt: PromptMessage, settings: Settings, param: str) -> None:
    if isinstance(part, TextPart):
        prompt.content.append({"type": "text", "text": part.text})
    elif isinstance(part, ImagePart):
        data = await fetch_media(part.image_url.url, settings, param, settings.max_image_bytes)
        prompt.fetched.append(("image", data, param))
        prompt.content.append({"type": "image"})
    elif part.video_url.url[:16].lower() == "data:video/jpeg;":
        prompt.fetched.append(("frames", split_frame_list(part.video_url.url, settings, param), param))
        prompt.content.append({"type": "video"})
    else:
        data = await fetch_media(part.video_url.url, settings, param, settings.max_video_bytes)
        prompt.fetched.append(("video", data, param))
        prompt.content.append({"type": "video"})




# ----------------------------------------------------------------------------- prompt

# A prompt averaging more characters a token than this is refused (or truncated) before it
# is tokenized (tokenizing first took 30-77 s for a 19 MB body, #15). English prose runs
# about 4 characters a token with BPE vocabularies of Qwen's size; 16 leaves room for text
# far denser than that, such as long runs of spaces.
MAX_CHARS_PER_TOKEN = 16


@lru_cache(maxsize=1)
def preprocess_pool() -> ThreadPoolExecutor:
    """Threads for tokenizing text-only requests; one torch thread each, as in media_pool."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess", initializer=torch.set_num_threads,
                              initargs=(1,))


async def prepare_prompt(req: ChatCompletionRequest, settings: Settings, processor, context: int,
                         cancel: threading.Event) -> tuple[str, Any, int]:
    """Check sizes, fetch media, then decode it and tokenize in one trip to a pool:
    (prompt, inputs, dropped turns).

    Requests with media go to the media pool, text-only ones to the preprocessing pool.
    `cancel` (the session's flag) stops decoding between frames; it is also set here when
    the awaiting request is cancelled, since the pool's thread would otherwise go on.
    """
    kept, dropped = fit_text_budget(req, settings, context)
    messages = await load_media(kept, settings)
    pool = media_pool() if any(m.fetched for m in messages) else preprocess_pool()
    work = partial(build_inputs, messages, settings, processor, context, cancel)
    try:
        prompt, inputs, truncated = await asyncio.get_running_loop().run_in_executor(pool, work)
    except asyncio.CancelledError:
        cancel.set()
        raise
    return prompt, inputs, dropped + truncated


def fit_text_budget(req: ChatCompletionRequest, settings: Settings, context: int) -> tuple[list, int]:
    """Checks that cost nothing next to tokenizing, made before any media is fetched:
    MAX_MESSAGES (550k tiny messages took 118 s to tokenize before their 400, #15), and
    the text's length against what the context can hold. With CONTEXT_OVERFLOW=truncate
    the oldest turns that could never fit are dropped here, as the token check would drop
    them. Returns the (index, message) pairs kept and how many were dropped."""
    parts = sum(len(m.content) if isinstance(m.content, list) else 1 for m in req.messages)
    if max(parts, len(req.messages)) > settings.max_messages:
        raise invalid(f"At most {settings.max_messages} messages and content parts per request.", "messages",
                      "too_many_messages")
    kept = list(enumerate(req.messages))
    chars = [text_chars(m) for _, m in kept]
    dropped = 0
    while sum(chars) > context * MAX_CHARS_PER_TOKEN:
        droppable = [k for k, (_, m) in enumerate(kept[:-1]) if m.role not in ("system", "developer")]
        if settings.context_overflow != "truncate" or not droppable:
            raise invalid(f"The prompt has {sum(chars)} characters, more than the model's context of {context} "
                          "tokens can hold.", "messages", "context_length_exceeded")
        del kept[droppable[0]], chars[droppable[0]]
        dropped += 1
    return kept, dropped


def text_chars(message: Message) -> int:
    if isinstance(message.content, list):
        return sum(len(part.text) for part in message.content if isinstance(part, TextPart))
    return len(message.content or "")


def tokenize(processor, messages: list[PromptMessage], settings: Settings):
    """(prompt text, processor inputs) for the messages and their media, in order."""
    prompt = processor.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                           tokenize=False, add_generation_prompt=True)
    images = [image for m in messages for image in m.images]
    videos = [video for m in messages for video in m.videos]
    image_size, video_size = vision_sizes(processor, settings)
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images_kwargs"] = {"size": image_size}
    if videos:  # frames were sampled in decode_video, with their original indices in the metadata
        kwargs.update(video_metadata=[v for m in messages for v in m.video_metadata], do_sample_frames=False,
                      videos_kwargs={"size": video_size})
    return prompt, processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt",
                             **kwargs)


def vision_sizes(processor, settings: Settings) -> tuple[dict, dict]:
    """The image and video processors' resize bounds, capped at MAX_IMAGE_TOKENS and
    MAX_VIDEO_TOKENS. Without a cap a legal 6000x6000 PNG became a 12-16k-token prompt
    whose prefill paused every running stream for 44-101 s (#15)."""
    video = processor.video_processor
    return (capped_size(processor.image_processor, settings.max_image_tokens, 1),
            capped_size(video, settings.max_video_tokens, video.temporal_patch_size))


def capped_size(processor, tokens: int, frames_per_token: int) -> dict:
    """A token is one merge_size x merge_size group of patch_size patches (32 x 32 pixels for
    Qwen3-VL), over temporal_patch_size frames for videos; Qwen's smart_resize scales an
    image, or a video's frames together, down to fit `longest_edge` pixels."""
    side = processor.patch_size * processor.merge_size
    longest = min(processor.size["longest_edge"], tokens * side * side * frames_per_token)
    return {"shortest_edge": min(processor.size["shortest_edge"], longest), "longest_edge": longest}


def build_inputs(messages: list[PromptMessage], settings: Settings, processor, context: int,
                 cancel: threading.Event):
    """Decode media and tokenize (blocking); over the context, 400 or (CONTEXT_OVERFLOW=truncate)
    drop the oldest non-system turns with their media. Returns (prompt, inputs, dropped)."""
    image_size, video_size = vision_sizes(processor, settings)  # the deadline runs from when a pool thread starts
    budget = DecodeBudget(settings.media_decode_timeout_seconds, cancel, image_pixels=image_size["longest_edge"],
                          video_pixels=video_size["longest_edge"])
    for message in messages:
        message.decode(settings, budget)
    prompt, inputs = tokenize(processor, messages, settings)
    if prompt_length(inputs) < context:
        return prompt, inputs, 0
    droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
    if settings.context_overflow != "truncate" or not droppable:
        raise over_context(prompt_length(inputs), context)
    return truncate_turns(messages, droppable, settings, processor, context)


def truncate_turns(messages: list[PromptMessage], droppable: list[int], settings: Settings, processor, context: int):
    """The prompt without the fewest oldest droppable turns that lets it fit: (prompt, inputs,
    dropped). Bisected, since tokens only fall as turns go: dropping one turn per try cost a
    tokenization of the whole prompt per dropped turn."""

    def without(count: int) -> tuple[str, Any]:
        gone = set(droppable[:count])
        return tokenize(processor, [m for i, m in enumerate(messages) if i not in gone], settings)

    low, high = 1, len(droppable)
    best = without(high)
    if prompt_length(best[1]) >= context:
        raise over_context(prompt_length(best[1]), context)
    while low < high:
        middle = (low + high) // 2
        attempt = without(middle)
        if prompt_length(attempt[1]) < context:
            high, best = middle, attempt
        else:
            low = middle + 1
    return *best, high


def prompt_length(inputs) -> int:
    return int(inputs["input_ids"].shape[1])


def over_context(tokens: int, context: int) -> APIError:
    return invalid(f"The prompt is {tokens} tokens; the model's context is {context}.", "messages",
                   "context_length_exceeded")


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float]

    @property
    def sampler_key(self) -> tuple:
        """Rows with equal keys are sampled together."""
        return ("greedy",) if self.temperature == 0 else (self.temperature, self.top_p, self.top_k)


def sampling_params(req: ChatCompletionRequest, s: Settings, prompt_tokens: int, context: int,
                    vocab_size: int) -> SamplingParams:
    asked = req.max_completion_tokens or req.max_tokens
    if asked and asked > s.max_tokens:
        raise invalid(f"max_tokens may be at most {s.max_tokens}.", "max_tokens", "invalid_value")
    max_new = min(asked or s.max_tokens, context - prompt_tokens)
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=s.temperature if req.temperature is None else req.temperature,
        top_p=s.top_p if req.top_p is None else req.top_p,
        top_k=s.top_k if req.top_k is None else max(req.top_k, 0),
        seed=req.seed, stop=req.stop,
        min_tokens=max_new if req.ignore_eos else min(req.min_tokens, max_new),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logit_bias=checked_logit_bias(req.logit_bias, vocab_size))


def checked_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> dict[int, float]:
    if bias and max(bias) >= vocab_size:
        raise invalid(f"logit_bias names a token id outside the vocabulary ({vocab_size}).", "logit_bias",
                      "invalid_value")
    return bias or {}


# ----------------------------------------------------------------------------- model

class ModelManager:
    """Lazily loaded model + processor, loaded once, off the event loop, behind a lock."""

    RETRY_AFTER_FAILURE_SECONDS = 30

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state: Literal["unloaded", "loading", "ready", "error"] = "unloaded"
        self.error = ""
        self.model = self.processor = None
        self.eos_ids: list[int] = []
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._task: asyncio.Future | None = None
        self._failed_at = 0.0

    async def ensure_loaded(self) -> None:
        if self.state == "ready":
            return
        if self.state == "error" and time.monotonic() - self._failed_at < self.RETRY_AFTER_FAILURE_SECONDS:
            raise self._unavailable()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(self.load))
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.settings.model_load_wait_seconds)
        except TimeoutError:
            pass
        if self.state != "ready":
            raise self._unavailable()

    def _unavailable(self) -> DomainError:
        if self.state == "error":
            return ModelLoadFailed(f"The model failed to load: {self.error}",
                                   retry_after=self.RETRY_AFTER_FAILURE_SECONDS)
        return ModelLoading("The model is loading; retry shortly.", retry_after=5)

    def load(self) -> None:
        with self._lock:
            if self.state == "ready":
                return
            self.state, started = "loading", time.monotonic()
            logger.info("model load start: %s", self.settings.model_repo_id)
            try:
                self.processor, self.model = self._from_pretrained()
                self.eos_ids = eos_token_ids(self.model)
            except Exception as exc:  # any loader failure is reported through /health and 503s
                self.state, self.error, self._failed_at = "error", f"{type(exc).__name__}: {exc}", time.monotonic()
                logger.error("model load failed: %s", self.error)
                return
            self.load_seconds = time.monotonic() - started
            self.state = "ready"
            logger.info("model ready in %.2f s (device=%s dtype=%s)", self.load_seconds,
                        self.model.device, self.model.dtype)

    def _from_pretrained(self):
        s = self.settings
        cuda = torch.cuda.is_available()
        dtype = (torch.bfloat16 if cuda else torch.float32) if s.torch_dtype == "auto" else getattr(torch, s.torch_dtype)
        device_map = s.device_map if (cuda or s.device_map != "auto") else None
        token = s.hf_token or None
        processor = AutoProcessor.from_pretrained(s.model_repo_id, token=token)
        model = AutoModelForImageTextToText.from_pretrained(
            s.model_repo_id, dtype=dtype, device_map=device_map, token=token)
        return processor, model.eval()

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        """Width of the logits, which is larger than the tokenizer's length."""
        return self.model.config.text_config.vocab_size


def eos_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(eos))


# ----------------------------------------------------------------------------- text pipeline

class StopMatcher:
    """Cuts the output before the first stop string, holding back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buffer[:min(hits)]
        keep = max((partial_suffix(buffer, s) for s in self.stops), default=0)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Routes text before `</think>` to reasoning_content and after it to content.

    The Thinking template opens `<think>` in the prompt, so the output only closes it;
    a template that opens nothing gets plain content unless the output starts a block.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, reasoning: bool):
        self.reasoning, self.held, self.closed, self.content_seen = reasoning, "", False, False

    def feed(self, text: str) -> list[tuple[str, str]]:
        buffer, out, self.held = self.held + text, [], ""
        while buffer:
            tag = self._tag()
            i = buffer.find(tag) if tag else -1
            if i >= 0:
                self._emit(out, buffer[:i])
                buffer, self.reasoning = buffer[i + len(tag):], tag == self.OPEN
                self.closed = self.closed or tag == self.CLOSE
                continue
            keep = partial_suffix(buffer, tag) if tag else 0
            self._emit(out, buffer[:len(buffer) - keep])
            self.held, buffer = buffer[len(buffer) - keep:], ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self.held)
        self.held = ""
        return out

    def _tag(self) -> str | None:
        if self.reasoning:
            return self.CLOSE
        return None if self.closed or self.content_seen else self.OPEN

    def _emit(self, out: list, text: str) -> None:
        if not text:
            return
        kind = "reasoning_content" if self.reasoning else "content"
        self.content_seen = self.content_seen or (kind == "content" and bool(text.strip()))
        out.append((kind, text))


class TextPipeline:
    """Decoded text in, (field, text) deltas out: stop strings first, then the reasoning split."""

    def __init__(self, stops: list[str], reasoning: bool):
        self.stop, self.split = StopMatcher(stops), ReasoningSplitter(reasoning)

    def feed(self, text: str) -> list[tuple[str, str]]:
        return self.split.feed(self.stop.feed(text))

    def flush(self) -> list[tuple[str, str]]:
        tail = [] if self.stop.stopped else self.split.feed(self.stop.flush())
        return tail + self.split.flush()




# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may share a process)."""

    TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen_http_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen_prompt_tokens", "Prompt tokens, vision tokens included", registry=r)
        self.completion_tokens = Counter("qwen_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("qwen_time_to_first_token_seconds", "Session start to first generated text",
                              buckets=self.TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("qwen_time_per_output_token_seconds", "Time between generated tokens",
                                       buckets=self.TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("qwen_decode_batch_size", "Rows decoded together per step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.resumes = Counter("qwen_stream_resumes", "Readers that resumed a session", registry=r)
        self.cancellations = Counter("qwen_cancellations", "Cancelled generations", ["reason"], registry=r)
        self.model_load_seconds = Gauge("qwen_model_load_seconds", "Duration of the last model load", registry=r)
        self.model_state = Gauge("qwen_model_state", "1 for the model's current state", ["state"], registry=r)
        self.queue_depth = Gauge("qwen_queue_depth", "Generations admitted and waiting", registry=r)
        self.running = Gauge("qwen_running_generations", "Generations decoding now", registry=r)
        self.sessions = Gauge("qwen_live_sessions", "Sessions held in memory", registry=r)
        self.listeners = Gauge("qwen_listeners", "Open SSE readers", registry=r)


# ----------------------------------------------------------------------------- engine

class GenerationSink(Protocol):
    """Where a generation's output goes: the one interface between engine and event shapers.

    Called on the event loop (the Outbox delivers), in order: deltas any number of times,
    then exactly one of finish or fail. A shaper turns these into protocol events.
    """

    def deltas(self, pieces: list[tuple[str, str]]) -> None:
        """(field, text) pieces: field is "reasoning_content" or "content"."""

    def finish(self, reason: str, completion_tokens: int) -> None:
        """reason: stop, length, cancelled or timeout."""

    def fail(self, message: str, completion_tokens: int) -> None:
        """The generation broke; message is safe to show."""


@dataclass(eq=False)
class Job:
    """One generation: prepared inputs in, output to its sink; all the worker needs to know."""

    id: str
    inputs: Any
    params: SamplingParams
    sink: GenerationSink
    reasoning: bool  # the prompt opened a think block
    prompt_tokens: int
    cancel: threading.Event  # set by the session layer (D6): cancel belongs to the job, not the log
    started: float = field(default_factory=time.monotonic)
    claimed: bool = False
    deadline: float = float("inf")
    last_token_at: float = 0.0
    text_posted: bool = False  # the worker has posted this job's first text
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def claim(self) -> bool:
        """First of worker (to run it) or canceller (to drop it) wins."""
        with self.lock:
            if self.claimed:
                return False
            self.claimed = True
            return True


class Detokenizer:
    """Token ids in, text out as soon as it decodes: only a partial UTF-8 character waits.

    transformers' TextStreamer holds text ending in symbols until the next space, which
    delays the first token by several steps; keeping one token of context is enough here
    (byte-level BPE decodes prefix-stably), and it keeps each decode O(1).
    """

    def __init__(self, tokenizer):
        rust = getattr(tokenizer, "_tokenizer", None)  # the fast tokenizer's own decode skips Python layers
        if rust is not None:
            self.decode = lambda ids: rust.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.cache: list[int] = []
        self.printed = 0
        self.count = 0

    def add(self, token: int) -> str:
        self.count += 1
        self.cache.append(token)
        text = self.decode(self.cache)
        if text.endswith("\ufffd"):
            return ""
        printable = text[self.printed:]
        self.cache = self.cache[-1:]
        self.printed = len(self.decode(self.cache))
        return printable

    def flush(self) -> str:
        text = self.decode(self.cache)[self.printed:] if self.cache else ""
        self.cache, self.printed = [], 0
        return text


class Stopping:
    """The one stop decision for a row after each token: the reason it ends, or None.

    Checked after the token's text went through the pipeline, so a stop string that this
    token completed counts. Cancel and the time cap stop within one decode step.
    """

    def __init__(self, job: Job, pipeline: TextPipeline, eos_ids: list[int]):
        self.job, self.pipeline, self.eos_ids = job, pipeline, eos_ids

    def reason(self, token: int, generated: int) -> str | None:
        if self.pipeline.stop.stopped:
            return "stop"
        if self.job.cancel.is_set():
            return "cancelled"
        if self.job.timed_out:
            return "timeout"
        if token in self.eos_ids:
            return "stop"
        return "length" if generated >= self.job.params.max_new_tokens else None


class Penalties:
    """logit_bias, then presence/frequency penalties as OpenAI defines them (generated tokens only)."""

    def __init__(self, prompt_len: int, p: SamplingParams):
        self.prompt_len, self.presence, self.frequency = prompt_len, p.presence_penalty, p.frequency_penalty
        self.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """ids: [1, prompt + generated]; scores: [1, vocab]."""
        if len(self.bias_ids):
            scores = scores.clone()
            scores[:, self.bias_ids.to(scores.device)] += self.bias_values.to(scores.device, scores.dtype)
        generated = ids[:, self.prompt_len:]
        if generated.shape[1] == 0 or not (self.presence or self.frequency):
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


@dataclass(eq=False)
class Row:
    """One request inside the running batch."""

    job: Job
    detokenizer: Detokenizer
    pipeline: TextPipeline
    stopping: Stopping
    penalties: Penalties | None
    generator: torch.Generator
    ids: torch.Tensor | None  # prompt + generated ids, kept only when penalties need them
    position: int = 0  # real tokens in the cache = text position of the next fed token
    rope_delta: int = 0  # M-RoPE offset of this row's t/h/w positions (from its vision tokens)
    last: int = -1
    generated: int = 0


class Batch:
    """Rows decoding together over one KV cache, left-padded to a common length.

    The attention mask marks each row's padding; position ids are given per row (four
    rows for M-RoPE: text position, then t/h/w = text position + the row's rope delta),
    so a row decodes exactly as it would alone.
    """

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = self.mask = None

    def join(self, row: Row, cache) -> None:
        mask = torch.ones(1, row.position, dtype=torch.long, device=cache.layers[0].keys.device)
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], row.position)
            self.mask = torch.cat([left_pad(self.cache, self.mask, width), left_pad(cache, mask, width)])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
        self.rows.append(row)

    def forward(self, model):
        """One decode step for every row: (rows, vocab) logits."""
        device = self.mask.device
        ids = torch.tensor([[row.last] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        text = torch.tensor([row.position for row in self.rows], device=device)
        spatial = text + torch.tensor([row.rope_delta for row in self.rows], device=device)
        positions = torch.stack([text, spatial, spatial, spatial]).view(4, len(self.rows), 1)
        # decode steps carry no vision input: the text model and lm_head directly skip the
        # multimodal wrapper's per-call checks (~5-8% of a tiny model's step)
        hidden = model.model.language_model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                                            cache=self.cache, use_cache=True).last_hidden_state
        for row in self.rows:
            row.position += 1
        return model.lm_head(hidden[:, -1, :])

    def drop(self, done: set[Row]) -> None:
        """Remove finished rows at once, and the left padding nobody needs any more."""
        keep = [i for i, row in enumerate(self.rows) if row not in done]
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        if len(keep) < len(self.rows):
            self.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.mask.device))
            self.mask = self.mask[keep]
            self.rows = [self.rows[i] for i in keep]
        unused = self.mask.shape[1] - max(row.position for row in self.rows)
        if unused > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]


def left_pad(cache, mask, width: int):
    """Pad a cache and its mask on the left (time axis) to `width` columns; returns the mask."""
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    for layer in cache.layers:
        batch, heads, _, dim = layer.keys.shape
        zeros = layer.keys.new_zeros(batch, heads, missing, dim)
        layer.keys, layer.values = torch.cat([zeros, layer.keys], dim=2), torch.cat([zeros, layer.values], dim=2)
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def prefill(model, inputs) -> tuple[Any, Any, int, int]:
    """Run one prompt alone: (last logits, its KV cache, prompt length, M-RoPE delta)."""
    inputs = inputs.to(model.device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    text = torch.arange(length, device=ids.device).view(1, 1, length)
    if "image_grid_thw" in vision or "video_grid_thw" in vision:
        spatial, delta = model.model.get_rope_index(
            ids, image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=vision.get("video_grid_thw"),
            attention_mask=mask, mm_token_type_ids=vision.get("mm_token_type_ids"))
        delta = int(delta.reshape(-1)[0])
    else:
        spatial, delta = text.expand(3, 1, length), 0
    cache = DynamicCache(config=model.config.text_config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=torch.cat([text, spatial]), cache=cache,
                use_cache=True, logits_to_keep=1, **vision)
    return out.logits[:, -1, :], cache, length, delta


def sample_tokens(scores, p: SamplingParams, generators: list) -> list[int]:
    """Rows that share sampling parameters: greedy, or temperature, top-k, top-p and one
    uniform draw per row from that request's own generator.

    Every operation works row by row, so a row gets the same token whatever else is in
    its group. Top-k comes first: at a 151,936-token vocabulary nothing sorts or draws
    over the whole of it (a full sort costs ~14 ms a row on CPU); without top-k and top-p
    only a cumulative sum runs over the vocabulary.
    """
    if p.temperature == 0:
        return scores.argmax(dim=-1).tolist()
    vocab = scores.shape[-1]
    k = p.top_k if 0 < p.top_k < vocab else vocab
    values, indices = scores.topk(k, dim=-1) if k < vocab or p.top_p < 1 else (scores, None)
    probs = torch.softmax(values.float() / p.temperature, dim=-1)
    if p.top_p < 1:
        probs = probs * ((probs.cumsum(-1) - probs) < p.top_p)
    cdf = probs.cumsum(-1)
    draws = torch.tensor([torch.rand((), generator=g).item() for g in generators], dtype=cdf.dtype)
    picks = torch.searchsorted(cdf, (draws.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).clamp(max=k - 1)
    return (indices.gather(-1, picks) if indices is not None else picks).reshape(-1).tolist()


class Outbox:
    """What the worker tells the event loop, delivered in order, at most once per interval.

    A delivery goes out at once when it carries a job's first text or its end, or when
    the last one is at least STREAM_INTERVAL_MS old; otherwise when the interval is up.
    Steps decoded meanwhile join it, and a job's consecutive deltas become one event.
    Under load the loop gets fewer, larger events instead of one wake-up and one SSE
    send per token per stream; time to first token is never traded for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[], None], interval: float):
        self.loop, self.release, self.interval = loop, release, interval
        self.items: list[tuple[Job, str, tuple]] = []
        self.scheduled = self.urgent = False
        self.last_delivery = 0.0
        self.lock = threading.Lock()

    def post(self, job: Job, kind: Literal["deltas", "finish", "fail"], *args) -> None:
        with self.lock:
            self.items.append((job, kind, args))
            self.urgent = self.urgent or kind != "deltas" or not job.text_posted
        job.text_posted = True

    def send(self) -> None:
        """End of a step (worker thread): schedule a delivery unless one is already due."""
        with self.lock:
            if not self.items or self.scheduled:
                return
            self.scheduled, urgent, self.urgent = True, self.urgent, False
        wait = 0.0 if urgent else self.interval - (time.monotonic() - self.last_delivery)
        if wait > 0:
            self.loop.call_soon_threadsafe(self.loop.call_later, wait, self._deliver)
        else:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
            self.last_delivery = time.monotonic()
        pending: dict[Job, list] = {}
        for job, kind, args in items:
            if kind == "deltas":
                pending.setdefault(job, []).extend(args[0])
                continue
            if job in pending:
                job.sink.deltas(pending.pop(job))
            if kind == "finish":
                job.sink.finish(*args)
            else:
                job.sink.fail(*args)
            self.release()  # the job's slot is free again
        for job, pieces in pending.items():
            job.sink.deltas(pieces)



class Worker:
    """The generation engine: one thread running a continuous-batching decode loop.

    Between decode steps it admits waiting jobs: each is prefilled alone (its images and
    video only there), its first token sampled, and its KV cache joined to the running
    batch (left-padded). Every step decodes one token for every row; rows that finish,
    are cancelled or fail leave at once. The rest of the server only calls admit(),
    submit(), cancel_waiting() and release(); session and SSE code never see rows.
    """

    def __init__(self, models: ModelManager, settings: Settings, metrics: Metrics, loop: asyncio.AbstractEventLoop):
        self.models, self.settings, self.metrics, self.loop = models, settings, metrics, loop
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.admitted = 0  # from admit() until the job ends or its request fails; event loop only
        self.batch = Batch()
        self.outbox = Outbox(loop, self.release, settings.stream_interval_ms / 1000)
        self.thread = threading.Thread(target=self._run, name="generate-worker", daemon=True)
        self.thread.start()

    # -- called on the event loop

    def admit(self) -> None:
        """Take a slot, or 429 before any media is decoded when running + queued are full."""
        if self.admitted >= self.settings.max_batch_size + self.settings.max_queue:
            raise QueueFull("The server is busy; retry shortly.", retry_after=2)
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    @property
    def running_count(self) -> int:
        return len(self.batch.rows)

    @property
    def queued(self) -> int:
        return max(self.admitted - self.running_count, 0)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def cancel_waiting(self, job: Job) -> bool:
        """Finish a job that has not started yet; False if the worker already has it."""
        if not job.claim():
            return False
        self.release()
        job.sink.finish("cancelled", 0)
        return True

    def stop(self) -> None:
        self.jobs.put(None)

    # -- the decode loop (worker thread)

    def _run(self) -> None:
        with torch.inference_mode():
            while self._fill_batch():
                if self.batch.rows:
                    self._decode_step()
                self.outbox.send()

    def _fill_batch(self) -> bool:
        """Admit waiting jobs, never letting an unexpected error kill the thread; False once stopped."""
        try:
            return self._admit_waiting()
        except Exception as exc:
            logger.exception("generation worker: admission failed")
            self._fail_all(exc)
            return True

    def _fail_all(self, exc: Exception) -> None:
        rows = list(self.batch.rows)
        for row in rows:
            self._fail(row.job, row.detokenizer.count, exc)
        self.batch.drop(set(rows))

    def _admit_waiting(self) -> bool:
        """Admit waiting jobs up to MAX_BATCH_SIZE and the step's prefill budget; False once stopped."""
        budget = self.settings.max_prefill_tokens_per_step
        while len(self.batch.rows) < self.settings.max_batch_size and budget > 0:
            try:
                job = self.jobs.get(block=not self.batch.rows)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.claim():
                budget -= job.prompt_tokens
                self._start(job)
                self.outbox.send()
        return True

    def _start(self, job: Job) -> None:
        """Prefill one job alone and join it to the batch; a failure fails this job only."""
        timeout = self.settings.generation_timeout_seconds
        job.deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
        try:
            row = self._new_row(job)
            logits, cache, row.position, row.rope_delta = prefill(self.models.model, job.inputs)
            token = self._pick([row], logits)[0]
        except Exception as exc:  # e.g. media the vision tower rejects: this row fails alone
            self._fail(job, 0, exc)
            return
        try:
            self.batch.join(row, cache)
        except Exception as exc:  # a half-joined cache is unusable for every row
            self._fail(job, 0, exc)
            self._fail_all(exc)
            return
        self._advance([row], [token])

    def _new_row(self, job: Job) -> Row:
        p = job.params
        pipeline = TextPipeline(p.stop, job.reasoning)
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        penalties = ids = None
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            penalties = Penalties(job.prompt_tokens, p)
            ids = job.inputs["input_ids"].to(self.models.model.device)
        return Row(job, Detokenizer(self.models.processor.tokenizer), pipeline,
                   Stopping(job, pipeline, self.models.eos_ids), penalties, torch.Generator().manual_seed(seed), ids)

    def _decode_step(self) -> None:
        rows = list(self.batch.rows)
        self.metrics.batch_size.observe(len(rows))
        try:
            logits = self.batch.forward(self.models.model)
            self._advance(rows, self._pick(rows, logits))
        except Exception as exc:  # a failed forward leaves no row in a known state
            logger.exception("generation worker: decode step failed")
            self._fail_all(exc)

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's own logits rules, then sampling in groups of rows that sample alike."""
        scores = [self._adjust(row, logits[i]) for i, row in enumerate(rows)]
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.job.params.sampler_key, []).append(i)
        tokens = [0] * len(rows)
        for members in groups.values():
            params = rows[members[0]].job.params
            picked = sample_tokens(torch.stack([scores[i] for i in members]), params,
                                   [rows[i].generator for i in members])
            for i, token in zip(members, picked):
                tokens[i] = token
        return tokens

    def _adjust(self, row: Row, scores: torch.Tensor) -> torch.Tensor:
        """EOS masked until min_tokens; logit_bias and OpenAI penalties."""
        if row.generated < row.job.params.min_tokens:
            scores = scores.clone()
            scores[self.models.eos_ids] = float("-inf")
        if row.penalties is not None:
            scores = row.penalties(row.ids, scores[None])[0]
        return scores

    def _advance(self, rows: list[Row], tokens: list[int]) -> None:
        """Stream each row's new token and retire the rows that are done."""
        done = set()
        for row, token in zip(rows, tokens):
            try:
                reason = self._accept(row, token)
            except Exception as exc:  # a bug in one row's text handling fails that row only
                self._fail(row.job, row.detokenizer.count, exc)
                done.add(row)
                continue
            if reason:
                self._finish(row, reason)
                done.add(row)
        if done:
            self.batch.drop(done)

    def _accept(self, row: Row, token: int) -> str | None:
        """Take the row's new token through detokenizer and text pipeline; the reason it ends, if any."""
        row.generated += 1
        row.last = token
        if row.ids is not None:
            row.ids = torch.cat([row.ids, row.ids.new_tensor([[token]])], dim=1)
        self._on_token(row.job, row.generated)
        text = row.detokenizer.add(token)
        if text:
            self._emit(row.job, row.pipeline.feed(text))
        return row.stopping.reason(token, row.generated)

    def _finish(self, row: Row, reason: str) -> None:
        self._emit(row.job, row.pipeline.feed(row.detokenizer.flush()) + row.pipeline.flush())
        self.outbox.post(row.job, "finish", reason, row.detokenizer.count)

    def _fail(self, job: Job, tokens: int, exc: Exception) -> None:
        logger.error("session %s generation failed: %s", job.id, type(exc).__name__, exc_info=exc)
        self.outbox.post(job, "fail", f"Generation failed: {type(exc).__name__}.", tokens)

    def _on_token(self, job: Job, count: int) -> None:
        now = time.monotonic()
        if count == 1:
            self.metrics.ttft.observe(now - job.started)
        else:
            self.metrics.token_latency.observe(now - job.last_token_at)
        job.last_token_at = now

    def _emit(self, job: Job, pieces: list[tuple[str, str]]) -> None:
        if pieces:
            self.outbox.post(job, "deltas", pieces)



# ----------------------------------------------------------------------------- event shapers

@dataclass
class Outcome:
    """How a session ended, as the log keeps it."""

    status: str = "in_progress"  # in_progress, completed, cancelled, failed, interrupted
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EventLog(Protocol):
    """What a shaper writes to: a session's append-only log (implemented in the sessions section)."""

    def append(self, data: str) -> int:
        """Add one event; returns its index."""

    def finish(self, outcome: Outcome) -> None:
        """Record how the session ended ([DONE] was appended just before)."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ChatChunkShaper:
    """A GenerationSink that writes `chat.completion.chunk` events and `[DONE]` to a log.

    The one place that shapes chunks, finish reasons and usage; the non-streamed
    response is assembled from the same events (chat_completion_body).
    """

    def __init__(self, log: EventLog, on_close: Callable[[Outcome], None], model: str, include_usage: bool,
                 prompt_tokens: int, truncated_messages: int = 0):
        self.log, self.on_close = log, on_close
        self.model, self.include_usage, self.prompt_tokens = model, include_usage, prompt_tokens
        self.truncated_messages = truncated_messages
        self.chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def start(self) -> None:
        """The role chunk; it also says how many old messages were dropped to fit the context."""
        extra = {"truncated_messages": self.truncated_messages} if self.truncated_messages else {}
        self._chunk({"role": "assistant", "content": ""}, extra=extra)

    def deltas(self, pieces: list[tuple[str, str]]) -> None:
        """One chunk per run of pieces going to the same field."""
        merged: list[list[str]] = []
        for name, text in pieces:
            if merged and merged[-1][0] == name:
                merged[-1][1] += text
            else:
                merged.append([name, text])
        for name, text in merged:
            self._chunk({name: text})

    def finish(self, reason: str, completion_tokens: int) -> None:
        self._chunk({}, reason)
        if self.include_usage:
            self.log.append(dumps({**self._envelope(), "choices": [], "usage": self.usage(completion_tokens)}))
        status = "cancelled" if reason == "cancelled" else "completed"
        self._close(Outcome(status, reason, self.prompt_tokens, completion_tokens))

    def fail(self, message: str, completion_tokens: int) -> None:
        self.log.append(dumps(error_body(message, "server_error", code="generation_failed")))
        self._close(Outcome("failed", None, self.prompt_tokens, completion_tokens))

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _chunk(self, delta: dict, finish_reason: str | None = None, extra: dict | None = None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        self.log.append(dumps({**self._envelope(), "choices": [choice], **(extra or {})}))

    def _envelope(self) -> dict:
        return {"id": self.chunk_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _close(self, outcome: Outcome) -> None:
        self.log.append("[DONE]")
        self.log.finish(outcome)
        self.on_close(outcome)


def chat_completion_body(events: list[str], outcome: Outcome, session_id: str, created: int, model: str) -> dict:
    """The chat.completion that a session's chunk events add up to, with the session's status."""
    text = {"content": [], "reasoning_content": []}
    chunk_id, error, truncated = f"chatcmpl-{session_id}", None, 0
    for data in events:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        error = chunk.get("error", error)
        truncated = chunk.get("truncated_messages", truncated)
        chunk_id, created = chunk.get("id", chunk_id), chunk.get("created", created)
        for choice in chunk.get("choices", []):
            for name, parts in text.items():
                parts.append(choice["delta"].get(name) or "")
    message = {"role": "assistant", "content": "".join(text["content"]),
               "reasoning_content": "".join(text["reasoning_content"]) or None}
    body = {"id": chunk_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                      "total_tokens": outcome.prompt_tokens + outcome.completion_tokens},
            "session_id": session_id, "status": outcome.status}
    if truncated:
        body["truncated_messages"] = truncated
    if error:
        body["error"] = error
    return body


# ----------------------------------------------------------------------------- sessions

@dataclass
class Event:
    index: int
    data: str


class SessionLog:
    """A session's append-only event log, kept in a memory ring buffer: an EventLog.

    A pure log (D6): append, read(after), follow(after), finish. Appends and reads
    happen on the event loop. Cancel belongs to the session and its job, not here.
    """

    def __init__(self, session_id: str, capacity: int, next_index: int = 0, outcome: Outcome | None = None):
        self.session_id = session_id
        self.events: deque[Event] = deque(maxlen=capacity)
        self.next_index = next_index
        self.visible = next_index - 1
        self.outcome = outcome or Outcome()
        self._changed = asyncio.Event()

    def append(self, data: str) -> int:
        event = Event(self.next_index, data)
        self.events.append(event)
        self.next_index += 1
        self._store(event)
        return event.index

    def _store(self, event: Event) -> None:
        self.publish(event.index)

    def publish(self, index: int) -> None:
        """Make events up to index visible to readers and wake them."""
        self.visible = max(self.visible, index)
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome

    @property
    def closed(self) -> bool:
        """True once the session has ended ([DONE] is appended in the same step)."""
        return self.outcome.status != "in_progress"

    @property
    def drained(self) -> bool:
        """True once [DONE] is visible to readers."""
        return self.closed and self.visible == self.next_index - 1

    @property
    def buffer_start(self) -> int:
        """The oldest index still in the ring buffer."""
        return self.events[0].index if self.events else self.next_index

    @property
    def oldest_kept(self) -> int:
        """The oldest index a reader can still get."""
        return self.buffer_start

    async def read(self, after: int) -> list[Event]:
        """Visible events with index > after; EventsGone if some of them are no longer kept."""
        first = self.buffer_start
        if after + 1 < first:
            return await self._read_older(after, first) + self._buffered(first - 1)
        return self._buffered(after)

    def _buffered(self, after: int) -> list[Event]:
        """Walk back from the newest event: readers mostly want the last few."""
        newer = []
        for event in reversed(self.events):
            if event.index <= after:
                break
            if event.index <= self.visible:
                newer.append(event)
        return newer[::-1]

    async def _read_older(self, after: int, first: int) -> list[Event]:
        raise EventsGone(f"Events after {after} are no longer kept (oldest kept: {first}).")

    async def follow(self, after: int) -> AsyncIterator[Event]:
        """Replay events after `after`, then follow live ones until [DONE]."""
        while True:
            changed = self._changed
            for event in await self.read(after):
                yield event
                after = event.index
            if self.drained and after >= self.next_index - 1:
                return
            await changed.wait()


class SQLiteWriter:
    """One thread that owns the write connection and commits in batches (group commit).

    Whatever queued up since the previous commit goes into the next transaction: at once
    when idle, at most every COMMIT_INTERVAL while events stream in. After each commit it
    tells the logs which of their events are durable (readers see only those).
    """

    COMMIT_INTERVAL = 0.025

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY, created REAL, finished REAL, status TEXT, finish_reason TEXT,
        prompt_tokens INTEGER, completion_tokens INTEGER);
    CREATE TABLE IF NOT EXISTS events (
        session_id TEXT, idx INTEGER, data TEXT, PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.loop = path, loop
        self.ops: queue.Queue = queue.Queue()
        self.read_lock = threading.Lock()
        self.reader = self._connect()
        self.reader.executescript(self.SCHEMA)
        self.thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self.thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def submit(self, sql: str, args: tuple, log: SessionLog | None = None, index: int = -1) -> None:
        self.ops.put((sql, args, log, index))

    def close(self) -> None:
        self.ops.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        conn, last_commit = self._connect(), 0.0
        while True:
            batch = [self.ops.get()]
            # idle: commit at once; streaming: at most one commit per interval, so the
            # transaction and the GIL are paid per batch of events, not per event
            time.sleep(max(0.0, self.COMMIT_INTERVAL - (time.monotonic() - last_commit)))
            while not self.ops.empty():
                batch.append(self.ops.get_nowait())
            done = batch[-1] is None
            self._commit(conn, [op for op in batch if op is not None])
            last_commit = time.monotonic()
            if done:
                conn.close()
                return

    def _commit(self, conn: sqlite3.Connection, batch: list) -> None:
        durable: dict[SessionLog, int] = {}
        try:
            conn.execute("BEGIN")
            for sql, args, log, index in batch:
                conn.execute(sql, args)
                if log is not None and index >= 0:
                    durable[log] = max(durable.get(log, -1), index)
            conn.execute("COMMIT")
        except sqlite3.Error:
            logger.exception("sqlite batch of %d writes failed", len(batch))
            conn.execute("ROLLBACK") if conn.in_transaction else None
            return
        for log, index in durable.items():
            self.loop.call_soon_threadsafe(log.publish, index)

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.read_lock:
            return self.reader.execute(sql, args).fetchall()


class SQLiteSessionLog(SessionLog):
    """The same log, written through to SQLite; readers see committed events only."""

    def __init__(self, session_id: str, capacity: int, writer: SQLiteWriter, next_index: int = 0,
                 outcome: Outcome | None = None, created: float | None = None):
        super().__init__(session_id, capacity, next_index, outcome)
        self.writer = writer
        if created is not None:
            writer.submit("INSERT INTO sessions (id, created, status) VALUES (?, ?, 'in_progress')",
                          (session_id, created))

    def __hash__(self) -> int:
        return id(self)

    def _store(self, event: Event) -> None:
        self.writer.submit("INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)",
                           (self.session_id, event.index, event.data), self, event.index)

    def finish(self, outcome: Outcome) -> None:
        super().finish(outcome)
        self.writer.submit(
            "UPDATE sessions SET finished=?, status=?, finish_reason=?, prompt_tokens=?, completion_tokens=? "
            "WHERE id=?", (time.time(), outcome.status, outcome.finish_reason, outcome.prompt_tokens,
                           outcome.completion_tokens, self.session_id))

    @property
    def oldest_kept(self) -> int:
        return 0

    async def _read_older(self, after: int, first: int) -> list[Event]:
        rows = await asyncio.to_thread(
            self.writer.query, "SELECT idx, data FROM events WHERE session_id=? AND idx>? AND idx<? ORDER BY idx",
            (self.session_id, after, first))
        return [Event(i, d) for i, d in rows]


def load_persisted(writer: SQLiteWriter, session_id: str, capacity: int) -> SQLiteSessionLog | None:
    """A finished session read back from SQLite (its events stay on disk until read)."""
    rows = writer.query("SELECT status, finish_reason, prompt_tokens, completion_tokens, finished FROM sessions "
                        "WHERE id=?", (session_id,))
    if not rows:
        return None
    status, reason, prompt, completion, _ = rows[0]
    last = writer.query("SELECT MAX(idx) FROM events WHERE session_id=?", (session_id,))[0][0]
    log = SQLiteSessionLog(session_id, capacity, writer, next_index=(last if last is not None else -1) + 1,
                           outcome=Outcome(status, reason, prompt or 0, completion or 0))
    log.visible = log.next_index - 1
    return log


def close_interrupted(writer: SQLiteWriter) -> int:
    """Sessions still generating when the last process died end as interrupted."""
    rows = writer.query("SELECT s.id, (SELECT MAX(idx) FROM events e WHERE e.session_id = s.id) "
                        "FROM sessions s WHERE s.status='in_progress'")
    error = json.dumps(error_body("Generation was interrupted by a server restart.", "server_error",
                                  code="interrupted"))
    for session_id, last in rows:
        nxt = (last if last is not None else -1) + 1
        for offset, data in enumerate((error, "[DONE]")):
            writer.submit("INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)",
                          (session_id, nxt + offset, data))
        writer.submit("UPDATE sessions SET status='interrupted', finished=? WHERE id=?", (time.time(), session_id))
    return len(rows)


@dataclass(eq=False)
class Session:
    """A log plus who is listening to it; the auto-cancel timer runs while nobody is."""

    id: str
    log: SessionLog
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    listeners: int = 0
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    job: Job | None = None
    cancel_reason: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)  # the job's cancel flag (D6)
    _timer: asyncio.TimerHandle | None = None

    def attach(self) -> None:
        self.listeners += 1
        if self._timer:
            self._timer.cancel()
            self._timer = None

    def detach(self, cancel_after: float) -> None:
        self.listeners -= 1
        if self.listeners == 0:
            self.arm_auto_cancel(cancel_after)

    def arm_auto_cancel(self, cancel_after: float) -> None:
        if cancel_after > 0 and not self.done.is_set() and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(cancel_after, self._auto_cancel)

    def _auto_cancel(self) -> None:
        self._timer = None
        if self.listeners == 0 and not self.done.is_set():
            logger.info("session %s auto-cancelled: no listener", self.id)
            self.cancel("auto")

    def cancel(self, reason: str) -> None:
        """Ask the generation to stop; the reason is what metrics count it under."""
        self.cancel_reason = self.cancel_reason or reason
        self.cancel_event.set()

    def close(self, outcome: Outcome) -> None:
        """The generation ended (its [DONE] is in the log)."""
        self.finished_at = time.time()
        self.done.set()
        logger.info("session %s %s (%s, %d tokens)", self.id, outcome.status, outcome.finish_reason,
                    outcome.completion_tokens)


class SessionRegistry:
    """Sessions by id: reservation, lookup (memory, then SQLite), expiry."""

    def __init__(self, settings: Settings, writer: SQLiteWriter | None):
        self.settings, self.writer = settings, writer
        self.sessions: dict[str, Session] = {}

    async def create(self, session_id: str | None) -> Session:
        """Reserve an id before any slow work, so two requests cannot both claim it.

        The disk lookup comes first (off the loop); the memory check and the insert then
        run with no await between them, so of two requests for one new id only one wins.
        """
        session_id = session_id or f"sess-{uuid.uuid4().hex}"
        persisted = self.writer is not None and await asyncio.to_thread(self._persisted, session_id)
        if persisted or session_id in self.sessions:
            raise SessionExists(f"Session '{session_id}' already exists; resume it with Last-Event-ID.",
                                param="session_id")
        self._make_room()
        session = Session(session_id, self._new_log(session_id))
        self.sessions[session_id] = session
        return session

    def _new_log(self, session_id: str) -> SessionLog:
        capacity = self.settings.buffer_events
        if self.writer:
            return SQLiteSessionLog(session_id, capacity, self.writer, created=time.time())
        return SessionLog(session_id, capacity)

    def _persisted(self, session_id: str) -> bool:
        return bool(self.writer.query("SELECT 1 FROM sessions WHERE id=?", (session_id,)))

    def _make_room(self) -> None:
        if len(self.sessions) < self.settings.max_sessions:
            return
        finished = sorted((s for s in self.sessions.values() if s.done.is_set()), key=lambda s: s.finished_at)
        if not finished:
            raise TooManySessions("Too many sessions in progress.", retry_after=5)
        for session in finished[: len(self.sessions) - self.settings.max_sessions + 1]:
            del self.sessions[session.id]

    def discard(self, session: Session) -> None:
        """Forget a session whose request failed before generation started."""
        self.sessions.pop(session.id, None)
        if self.writer:
            self.writer.submit("DELETE FROM sessions WHERE id=?", (session.id,))

    async def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None and self.writer:
            log = await asyncio.to_thread(load_persisted, self.writer, session_id, self.settings.buffer_events)
            if log is not None:
                session = self.sessions.setdefault(session_id, Session(session_id, log, finished_at=time.time()))
                session.done.set()
        if session is None:
            raise SessionNotFound(f"Session '{session_id}' not found.")
        return session

    def expire(self) -> None:
        cutoff = time.time() - self.settings.sessions_ttl_seconds
        for session in [s for s in self.sessions.values() if s.finished_at and s.finished_at < cutoff]:
            del self.sessions[session.id]
        if self.writer:
            self.writer.submit("DELETE FROM events WHERE session_id IN "
                               "(SELECT id FROM sessions WHERE finished IS NOT NULL AND finished < ?)", (cutoff,))
            self.writer.submit("DELETE FROM sessions WHERE finished IS NOT NULL AND finished < ?", (cutoff,))




# ----------------------------------------------------------------------------- http

SHUTDOWN_GRACE_SECONDS = 5.0
LAST_EVENT_ID = re.compile(r"^(?P<sid>[A-Za-z0-9._-]{1,128}):(?P<idx>-?\d{1,18})$")


@dataclass
class AppState:
    settings: Settings
    models: ModelManager
    sessions: SessionRegistry
    worker: Worker
    writer: SQLiteWriter | None
    metrics: Metrics
    server_exit: anyio.Event  # set once when the server starts shutting down (sse-starlette or our signal hook)
    shutting_down: bool = False


def state_of(request: Request) -> AppState:
    return request.app.state.server


def parse_last_event_id(request: Request) -> tuple[str, int] | None:
    """The resume point from the Last-Event-ID header, else the last_event_id query."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None:
        return None
    match = LAST_EVENT_ID.match(raw.strip())
    if not match or int(match["idx"]) < -1:
        raise invalid("Last-Event-ID must look like '<session_id>:<index>'.", "Last-Event-ID", "invalid_last_event_id")
    return match["sid"], int(match["idx"])


def sse_response(state: AppState, session: Session, after: int) -> EventSourceResponse:
    """A reader of the session's log: replay after `after`, then follow live events.

    It knows nothing of shutdown: the app's one watcher ends the generations, and with
    them the streams, when server_exit is set.
    """
    if after > session.log.visible:
        raise invalid(f"Index {after} is beyond the session's last event.", "Last-Event-ID", "invalid_last_event_id")
    if after + 1 < session.log.oldest_kept:
        raise EventsGone(f"Events after {after} are no longer kept.", param="Last-Event-ID")
    settings = state.settings

    async def events():
        session.attach()
        try:
            async for event in session.log.follow(after):
                yield {"id": f"{session.id}:{event.index}", "data": event.data}
        except EventsGone:  # this reader fell a whole buffer behind; a reconnect gets 410
            logger.warning("session %s reader fell behind the ring buffer", session.id)
        finally:
            session.detach(settings.cancel_after_disconnect_seconds)

    return EventSourceResponse(events(), ping=settings.sse_ping_seconds, send_timeout=settings.sse_send_timeout_seconds,
                               shutdown_event=state.server_exit, shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
                               headers={"X-Session-Id": session.id, "Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})


async def read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("The body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.", None, "invalid_json")
    return body


def close_session(state: AppState, session: Session, outcome: Outcome) -> None:
    """A shaper's on_close: count the session in metrics and mark it done."""
    state.metrics.prompt_tokens.inc(outcome.prompt_tokens)
    state.metrics.completion_tokens.inc(outcome.completion_tokens)
    if outcome.status == "cancelled":
        state.metrics.cancellations.labels(session.cancel_reason or "unknown").inc()
    session.close(outcome)


async def prepare_job(state: AppState, req: ChatCompletionRequest, session: Session) -> Job:
    """Fetch media, then decode it, apply the chat template and tokenize in one trip to the pool."""
    prompt, inputs, dropped = await prepare_prompt(req, state.settings, state.models.processor,
                                                   state.models.context_length, session.cancel_event)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    params = sampling_params(req, state.settings, prompt_tokens, state.models.context_length,
                             state.models.vocab_size)
    shaper = ChatChunkShaper(session.log, partial(close_session, state, session), state.settings.model_name,
                             bool(req.stream_options and req.stream_options.include_usage), prompt_tokens, dropped)
    shaper.start()
    return Job(session.id, inputs, params, shaper, reasoning=prompt.rstrip().endswith(ReasoningSplitter.OPEN),
               prompt_tokens=prompt_tokens, cancel=session.cancel_event, started=session.started)


async def start_session(state: AppState, req: ChatCompletionRequest) -> Session:
    """Admit, reserve the id, prepare and submit; every refusal comes before media is decoded."""
    if state.shutting_down:
        raise ShuttingDown("The server is shutting down.", retry_after=10)
    check_media_counts(req, state.settings)
    state.worker.admit()
    session = None
    try:
        await state.models.ensure_loaded()
        session = await state.sessions.create(req.session_id)
        job = await prepare_job(state, req, session)
    except BaseException:
        state.worker.release()
        if session is not None:
            state.sessions.discard(session)
        raise
    session.job = job
    state.worker.submit(job)
    session.arm_auto_cancel(state.settings.cancel_after_disconnect_seconds)
    logger.info("session %s start (prompt %d tokens, max %d, stream=%s)", session.id,
                job.prompt_tokens, job.params.max_new_tokens, req.stream)
    return session


async def resume(state: AppState, session_id: str | None, point: tuple[str, int]) -> EventSourceResponse:
    sid, after = point
    if session_id and session_id != sid:
        raise invalid("Last-Event-ID names another session than the path or body.", "Last-Event-ID",
                      "invalid_last_event_id")
    session = await state.sessions.get(sid)
    logger.info("session %s resume after %d", sid, after)
    state.metrics.resumes.inc()
    return sse_response(state, session, after)


async def completion_body(state: AppState, session: Session) -> dict:
    try:
        events = await session.log.read(-1)
    except EventsGone:
        raise EventsGone("This session's events are no longer kept.") from None
    return chat_completion_body([e.data for e in events], session.log.outcome, session.id, session.created,
                                state.settings.model_name)


async def wait_briefly(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


async def wait_for_completion(state: AppState, session: Session) -> JSONResponse:
    session.attach()
    try:
        await session.done.wait()
    finally:
        session.detach(state.settings.cancel_after_disconnect_seconds)
    body = await completion_body(state, session)
    if body["status"] == "failed":
        raise GenerationFailed(body["error"]["message"])
    return JSONResponse(body, headers={"X-Session-Id": session.id})


def request_body_schema() -> dict:
    """ChatCompletionRequest's JSON schema with $refs inlined (the body is parsed by hand, for resume)."""
    schema = ChatCompletionRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict:
    models = state_of(request).models
    status = {"unloaded": "loading", "loading": "loading"}.get(models.state, models.state)
    return {"status": status, "model": state_of(request).settings.model_name, "error": models.error or None}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    name = state_of(request).settings.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]}


@router.post("/v1/chat/completions", openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": request_body_schema()}}}})
async def chat_completions(request: Request) -> Any:
    state = state_of(request)
    body = await read_json(request)
    point = parse_last_event_id(request)
    if point is not None:
        sid = body.get("session_id")
        return await resume(state, sid if isinstance(sid, str) else None, point)
    req = validate_request(body)
    refuse_unsupported(req)
    session = await start_session(state, req)
    if req.stream:
        return sse_response(state, session, -1)
    return await wait_for_completion(state, session)


@router.get("/v1/chat/completions/{session_id}")
async def get_completion(request: Request, session_id: str, stream: bool = False) -> Any:
    state = state_of(request)
    point = parse_last_event_id(request)
    session = await state.sessions.get(session_id)
    if stream:
        return await resume(state, session_id, point or (session_id, -1))
    return JSONResponse(await completion_body(state, session), headers={"X-Session-Id": session.id})


@router.post("/v1/cancel/{session_id}")
async def cancel(request: Request, session_id: str) -> dict:
    state = state_of(request)
    session = await state.sessions.get(session_id)
    if not session.done.is_set():
        logger.info("session %s cancel requested", session_id)
        session.cancel("manual")
        if session.job is None or not state.worker.cancel_waiting(session.job):
            await wait_briefly(session.done, 5.0)
    return {"id": session_id, "object": "session", "status": session.log.outcome.status}


# Domain errors to (status, type, code): the one place the engine's refusals meet HTTP.
ERROR_TABLE: dict[type[DomainError], tuple[int, str, str]] = {
    QueueFull: (429, "rate_limit_exceeded", "queue_full"),
    TooManySessions: (429, "rate_limit_exceeded", "too_many_sessions"),
    ModelLoading: (503, "server_error", "model_loading"),
    ModelLoadFailed: (503, "server_error", "model_load_failed"),
    ShuttingDown: (503, "server_error", "shutting_down"),
    SessionExists: (409, "invalid_request_error", "session_exists"),
    SessionNotFound: (404, "invalid_request_error", "not_found"),
    EventsGone: (410, "invalid_request_error", "events_expired"),
    GenerationFailed: (500, "server_error", "generation_failed"),
}


async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
    status, kind, code = ERROR_TABLE[type(exc)]
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else None
    return JSONResponse(error_body(exc.message, kind, exc.param, code), status, headers=headers)


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return JSONResponse(error_body(f"{param}: {first['msg']}", "invalid_request_error", param, "invalid_value"), 400)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind, None, kind if exc.status_code == 404 else None),
                        exc.status_code, headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id_var.get()
    logger.exception("request %s failed", rid)
    return JSONResponse(error_body(f"Internal server error (request id {rid}).", "server_error", None,
                                   "internal_error"), 500)


EXCEPTION_HANDLERS: dict[type[Exception], Callable] = {
    DomainError: domain_error, APIError: api_error, RequestValidationError: validation_error,
    StarletteHTTPException: http_error, Exception: server_error,
}


# ----------------------------------------------------------------------------- middleware

class RequestIdMiddleware:
    """Pure ASGI: a request id per request (X-Request-Id accepted and echoed) for logs and 500s."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given) else uuid.uuid4().hex
        request_id_var.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


async def send_error(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An OpenAI error body from pure ASGI middleware."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Pure ASGI: 413 for bodies over MAX_REQUEST_BYTES, by Content-Length or counted as they stream.

    The body is buffered here and replayed to the app; later receive() calls pass through,
    so SSE responses still see the client's disconnect.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay([body], receive), send)

    async def _refuse(self, send) -> None:
        await send_error(send, 413, error_body(f"The request body is larger than {self.limit} bytes.",
                                                "invalid_request_error", None, "request_too_large"))


def replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


class APIKeyMiddleware:
    """Pure ASGI: `Authorization: Bearer <key>` on every /v1 route when API_KEY is set."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        # compare against every key so timing does not tell which one nearly matched
        if not sum(hmac.compare_digest(token, key) for key in self.keys):
            return await send_error(send, 401, error_body("Missing or invalid API key.", "invalid_request_error",
                                                          None, "invalid_api_key"),
                                    [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)



class MetricsMiddleware:
    """Pure ASGI: counts responses by route template (never the raw path: session ids) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)




# ----------------------------------------------------------------------------- app

def watch_gauges(metrics: Metrics, state: AppState) -> None:
    """Gauges read at scrape time from the objects that own the numbers."""
    metrics.queue_depth.set_function(lambda: state.worker.queued)
    metrics.running.set_function(lambda: state.worker.running_count)
    metrics.sessions.set_function(lambda: len(state.sessions.sessions))
    metrics.listeners.set_function(lambda: sum(s.listeners for s in state.sessions.sessions.values()))
    metrics.model_load_seconds.set_function(lambda: state.models.load_seconds)
    for name in ("unloaded", "loading", "ready", "error"):
        metrics.model_state.labels(name).set_function(lambda name=name: float(state.models.state == name))


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    loop = asyncio.get_running_loop()
    models = ModelManager(settings)
    writer = SQLiteWriter(settings.sessions_db_path, loop) if settings.persist_sessions else None
    if writer:
        interrupted = await asyncio.to_thread(close_interrupted, writer)
        logger.info("sessions db %s open (%d interrupted sessions closed)", settings.sessions_db_path, interrupted)
    metrics: Metrics = app.state.metrics
    state = AppState(settings, models, SessionRegistry(settings, writer), Worker(models, settings, metrics, loop),
                     writer, metrics, anyio.Event())
    watch_gauges(metrics, state)
    app.state.server = state
    if settings.preload_model:
        asyncio.ensure_future(asyncio.to_thread(models.load))
    tasks = [asyncio.ensure_future(sweep_sessions(state)), asyncio.ensure_future(stop_on_exit(state))]
    yield
    for task in tasks:
        task.cancel()
    await shutdown(state)


async def sweep_sessions(state: AppState) -> None:
    interval = max(1.0, min(60.0, state.settings.sessions_ttl_seconds / 2))
    while True:
        await asyncio.sleep(interval)
        state.sessions.expire()


async def stop_on_exit(state: AppState) -> None:
    """The one shutdown watcher: when the server starts exiting, end every generation so
    open streams get their final event and [DONE] and non-streamed callers their answer."""
    await state.server_exit.wait()
    await stop_generations(state)


async def stop_generations(state: AppState) -> None:
    """Stop admitting, then cancel every unfinished generation (each ends with its final event)."""
    if not state.shutting_down:
        logger.info("shutdown: refusing new generations")
    state.shutting_down = True
    running = [s for s in state.sessions.sessions.values() if not s.done.is_set()]
    for session in running:
        session.cancel("shutdown")
        if session.job is not None:
            state.worker.cancel_waiting(session.job)
    for session in running:
        await wait_briefly(session.done, SHUTDOWN_GRACE_SECONDS)


async def shutdown(state: AppState) -> None:
    """Generations stopped, worker ended, SQLite flushed: nothing half-written."""
    await stop_generations(state)
    state.worker.stop()
    if state.writer:
        await asyncio.to_thread(state.writer.close)
    logger.info("shutdown complete")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="Qwen3-VL OpenAI-compatible server", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    configure_logging(settings.log_level)
    for exc_class, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    app.include_router(router)
    add_middleware(app, settings)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost last: CORS answers preflights, then metrics, request ids, body limit, API keys."""
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"],
                           expose_headers=["X-Session-Id", "X-Request-Id"])


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    """Lifecycle logs carry the request id; bodies, media, keys and tokens are never logged."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class GracefulServer(uvicorn.Server):
    """uvicorn that tells the app the moment it starts exiting (SIGINT/SIGTERM), so
    generations that no stream is reading (non-streamed requests) stop as well."""

    def __init__(self, config: uvicorn.Config, served: FastAPI):
        super().__init__(config)
        self.served = served

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = getattr(self.served.state, "server", None)
        if state is not None:
            state.worker.loop.call_soon_threadsafe(state.server_exit.set)
        super().handle_exit(sig, frame)


app = create_app()

if __name__ == "__main__":
    settings = app.state.settings
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    GracefulServer(config, app).run()
