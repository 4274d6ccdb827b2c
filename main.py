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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import hashlib
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
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, AsyncIterator, Callable, Literal
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("qwen3vl_server")


# ----------------------------------------------------------------------------- settings

class Settings(BaseSettings):
    """Every knob of the server; read once from the environment and `.env`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(3000, description="Port to listen on.")
    log_level: str = Field("info", description="Python log level.")
    model_repo_id: str = Field("Qwen/Qwen3-VL-2B-Thinking", description="Hub model id or a local directory.")
    served_model_name: str = Field("", description="Model name reported by the API; empty means MODEL_REPO_ID.")
    hf_token: str = Field("", description="Hugging Face token for gated or private repos.")
    device_map: str = Field("auto", description="Transformers device_map; 'auto' uses the GPU when there is one.")
    torch_dtype: str = Field("auto", description="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")
    preload_model: bool = Field(False, description="Load the model at startup instead of on the first request.")
    model_load_wait_seconds: float = Field(120.0, description="How long a request waits for a loading model before 503.")
    max_tokens: int = Field(8192, description="Default and upper bound of max_tokens per request.")
    temperature: float = Field(0.6, description="Default sampling temperature (Qwen's advice for Thinking models).")
    top_p: float = Field(0.95, description="Default nucleus sampling threshold.")
    top_k: int = Field(20, description="Default top-k; 0 disables it.")
    max_video_frames: int = Field(16, description="Frames sampled uniformly from each video, at most.")
    max_request_bytes: int = Field(20_000_000, description="Largest request body; larger ones get 413 unread.")
    max_image_bytes: int = Field(10_000_000, description="Largest image, as a data URI or fetched.")
    max_image_pixels: int = Field(36_000_000, description="Most pixels in an image or video frame (checked before decoding).")
    max_images_per_request: int = Field(8, description="Most images in one request.")
    max_video_bytes: int = Field(50_000_000, description="Largest video, as a data URI or fetched.")
    max_video_seconds: float = Field(600.0, description="Longest video accepted.")
    max_video_decoded_frames: int = Field(36_000, description="Most frames a video may hold (all are demuxed).")
    max_videos_per_request: int = Field(2, description="Most videos in one request.")
    media_fetch_timeout_seconds: float = Field(10.0, description="Connect/read timeout when fetching media URLs.")
    allow_private_media: bool = Field(False, description="Allow media URLs on loopback/private/link-local addresses.")
    private_media_networks: str = Field("", description="Comma list of CIDRs exempt from the private-address block.")
    allowed_media_domains: str = Field("", description="Comma list of domains media URLs must be on; empty allows all.")
    allowed_local_media_path: str = Field("", description="Directory whose files may be named as media; empty refuses paths.")
    api_key: str = Field("", description="Bearer key, or a comma list of keys, required on /v1 routes; empty disables.")
    cors_allow_origins: str = Field("", description="Comma list of origins allowed by CORS; empty disables CORS.")
    web_ui: bool = Field(True, description="Serve the chat page at / (files in static/); 0 for API-only deployments.")
    max_batch_size: int = Field(8, description="Generations decoded together (continuous batching); 1 = one at a time.")
    max_prefill_tokens_per_step: int = Field(
        2048, description="Prompt tokens prefilled between two decode steps (a longer prompt runs alone).")
    max_queue: int = Field(16, description="Generations that may wait behind the running ones; more get 429.")
    generation_timeout_seconds: float = Field(600.0, description="Longest one generation may decode; 0 disables.")
    context_overflow: Literal["error", "truncate"] = Field(
        "error", description="Prompt over the context: error (400) or truncate (drop the oldest non-system turns).")
    session_buffer_events: int = Field(0, description="Events kept in memory per session; 0 means MAX_TOKENS + 16.")
    max_sessions: int = Field(256, description="Sessions kept in memory; the oldest finished ones are dropped first.")
    sessions_ttl_seconds: float = Field(3600.0, description="Finished sessions are deleted this long after they end.")
    persist_sessions: bool = Field(False, description="Write sessions to SQLite so streams replay after a restart.")
    sessions_db_path: str = Field("data/sessions.db", description="SQLite file used when PERSIST_SESSIONS=1.")
    cancel_after_disconnect_seconds: float = Field(
        3600.0, description="Cancel a generation nobody has listened to for this long; 0 disables.")
    stream_interval_ms: float = Field(
        10.0, description="Least time between two deliveries of new tokens to streams; 0 sends every step.")
    sse_ping_seconds: float = Field(15.0, description="Interval of SSE keep-alive comments.")
    sse_send_timeout_seconds: float = Field(30.0, description="A client that accepts no bytes this long is dropped.")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_repo_id

    @property
    def buffer_events(self) -> int:
        return self.session_buffer_events or self.max_tokens + 16


# ----------------------------------------------------------------------------- errors

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class APIError(Exception):
    """An error the client should see, in OpenAI's shape, with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str) -> APIError:
    return APIError(404, message, code="not_found")


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


# ----------------------------------------------------------------------------- media loading

ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
DATA_URI_HEADER = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64$")
MAX_REDIRECTS = 3


def too_large(message: str, param: str | None, code: str) -> APIError:
    return APIError(413, message, param=param, code=code)


def check_media_counts(req: "ChatCompletionRequest", settings: Settings) -> None:
    """Refuse too many media parts before anything is fetched or decoded."""
    parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content]
    images = sum(isinstance(p, ImagePart) for p in parts)
    videos = sum(isinstance(p, VideoPart) for p in parts)
    if images > settings.max_images_per_request:
        raise too_large(f"At most {settings.max_images_per_request} images per request.", "messages",
                        "too_many_images")
    if videos > settings.max_videos_per_request:
        raise too_large(f"At most {settings.max_videos_per_request} videos per request.", "messages",
                        "too_many_videos")


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
    """GET with timeouts and a streamed byte cap, re-checking the address of every redirect hop.

    Each hop connects to the very address that was checked (the Host header and TLS SNI
    keep the name), so a DNS answer that changes between check and connect cannot
    reach a private address.
    """
    timeout = httpx.Timeout(settings.media_fetch_timeout_seconds)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host = await pin_address(url, settings, param)
            try:
                async with client.stream("GET", pinned, headers={"Host": host},
                                         extensions={"sni_hostname": host.split(":")[0].strip("[]")}) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise invalid(f"Fetching media failed with HTTP {response.status_code}.", param,
                                      "media_fetch_failed")
                    return await read_capped(response, limit, param)
            except httpx.HTTPError as exc:
                raise invalid(f"Fetching media failed: {type(exc).__name__}.", param, "media_fetch_failed") from None
    raise invalid("Too many redirects while fetching media.", param, "media_fetch_failed")


async def pin_address(url: str, settings: Settings, param: str) -> tuple[str, str]:
    """(URL rewritten to a checked IP address, original Host header) or a 400."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise invalid("Media URLs must be http(s) URLs or data URIs.", param, "invalid_media_url")
    if not domain_allowed(host, settings.allowed_media_domains):
        raise invalid(f"Media host '{host}' is not in the allowed domains.", param, "media_url_forbidden")
    port = parts.port or (443 if parts.scheme == "https" else 80)
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
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), parts.netloc.rsplit("@", 1)[-1]


def domain_allowed(host: str, allowed: str) -> bool:
    domains = [d.strip().lower().lstrip(".") for d in allowed.split(",") if d.strip()]
    host = host.lower().rstrip(".")
    return not domains or any(host == d or host.endswith("." + d) for d in domains)


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> bool:
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if settings.allow_private_media or any(ip in net for net in media_networks(settings.private_media_networks)):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback)


@lru_cache(maxsize=8)
def media_networks(spec: str) -> tuple:
    return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in spec.split(",") if n.strip())


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


def decode_image(data: bytes, param: str, max_pixels: int):
    """An RGB PIL image; the pixel count is checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ALLOWED_IMAGE_FORMATS:
            raise invalid(f"Image format {image.format} is not supported.", param, "invalid_image")
        if image.width * image.height > max_pixels:
            raise too_large(f"Images may have at most {max_pixels} pixels.", param, "image_too_large")
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise too_large(f"Images may have at most {max_pixels} pixels.", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise invalid(f"The image could not be decoded ({type(exc).__name__}).", param, "invalid_image") from None


def decode_video(data: bytes, settings: Settings, param: str):
    """Uniformly sample at most MAX_VIDEO_FRAMES RGB frames with PyAV; returns (frames, metadata)."""
    import av
    import numpy as np
    from transformers.video_utils import VideoMetadata

    try:
        total, fps, width, height = probe_video(data, settings, param)
        wanted = np.linspace(0, total - 1, min(settings.max_video_frames, total)).round().astype(int)
        frames, indices = read_frames(data, set(wanted.tolist()))
    except (av.FFmpegError, IndexError, ValueError, OSError, ZeroDivisionError) as exc:
        raise invalid(f"The video could not be decoded ({type(exc).__name__}).", param, "invalid_video") from None
    if not frames:
        raise invalid("The video holds no decodable frames.", param, "invalid_video")
    if len(frames) == 1:  # the vision tower groups frames in pairs
        frames, indices = frames * 2, indices * 2
    meta = VideoMetadata(total_num_frames=total, fps=fps, width=width, height=height, duration=total / fps,
                         video_backend="pyav", frames_indices=np.array(indices))
    return np.stack(frames), meta


def probe_video(data: bytes, settings: Settings, param: str) -> tuple[int, float, int, int]:
    """(frames, fps, width, height) from the container, refusing oversize videos before decoding."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 24)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > settings.max_image_pixels:
            raise too_large(f"Video frames may have at most {settings.max_image_pixels} pixels.", param,
                            "video_too_large")
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if total / fps > settings.max_video_seconds or total > settings.max_video_decoded_frames:
        raise too_large(f"Videos may last at most {settings.max_video_seconds:g} s and "
                        f"{settings.max_video_decoded_frames} frames.", param, "video_too_large")
    if total < 1:
        raise invalid("The video holds no frames.", param, "invalid_video")
    return total, fps, width, height


def read_frames(data: bytes, wanted: set[int]) -> tuple[list, list[int]]:
    import av

    frames, indices, last = [], [], max(wanted)
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
                indices.append(i)
            if i >= last:
                break
    return frames, indices


@dataclass
class PromptMessage:
    """One message ready for the chat template, with the media its placeholders stand for."""

    role: str
    content: str | list[dict]
    fetched: list[tuple[str, bytes, str]] = field(default_factory=list)  # (kind, bytes, param), in order
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_metadata: list = field(default_factory=list)

    def decode(self, settings: Settings) -> None:
        """Fetched bytes to PIL images and sampled video frames (blocking; preprocessing pool)."""
        for kind, data, param in self.fetched:
            if kind == "image":
                self.images.append(decode_image(data, param, settings.max_image_pixels))
            else:
                frames, meta = decode_video(data, settings, param)
                self.videos.append(frames)
                self.video_metadata.append(meta)
        self.fetched = []


@lru_cache(maxsize=1)
def preprocess_pool() -> ThreadPoolExecutor:
    """Threads for decoding media and running the processor, each limited to one torch thread.

    A thread that runs torch ops gets its own OpenMP team; left at the default size, those
    teams fight the decode loop's for the same cores (measured: decode steps 2.9 -> 3.8 ms
    after one image was preprocessed in asyncio's default executor).
    """
    def one_torch_thread() -> None:
        import torch

        torch.set_num_threads(1)

    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess", initializer=one_torch_thread)


async def off_loop(fn: Callable, *args) -> Any:
    """Run CPU-bound preprocessing in the preprocessing pool."""
    return await asyncio.get_running_loop().run_in_executor(preprocess_pool(), partial(fn, *args))


async def load_media(req: "ChatCompletionRequest", settings: Settings) -> list[PromptMessage]:
    """Messages with their media fetched (not yet decoded), replaced by template placeholders."""
    out = []
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            out.append(PromptMessage(role, message.content or ""))
            continue
        prompt = PromptMessage(role, [])
        for j, part in enumerate(message.content):
            await load_part(part, prompt, settings, f"messages.{i}.content.{j}")
        out.append(prompt)
    return out


async def load_part(part: "ContentPart", prompt: PromptMessage, settings: Settings, param: str) -> None:
    if isinstance(part, TextPart):
        prompt.content.append({"type": "text", "text": part.text})
    elif isinstance(part, ImagePart):
        data = await fetch_media(part.image_url.url, settings, param, settings.max_image_bytes)
        prompt.fetched.append(("image", data, param))
        prompt.content.append({"type": "image"})
    else:
        data = await fetch_media(part.video_url.url, settings, param, settings.max_video_bytes)
        prompt.fetched.append(("video", data, param))
        prompt.content.append({"type": "video"})


# ----------------------------------------------------------------------------- model

class ModelManager:
    """Lazily loaded model + processor, loaded once, off the event loop, behind a lock."""

    RETRY_AFTER_FAILURE_SECONDS = 30

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state: Literal["unloaded", "loading", "ready", "error"] = "unloaded"
        self.error = ""
        self.model = self.processor = None
        self.streamer_class = self.flag_stop = self.penalties = None
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

    def _unavailable(self) -> APIError:
        if self.state == "error":
            return APIError(503, f"The model failed to load: {self.error}", "server_error", code="model_load_failed",
                            headers={"Retry-After": str(self.RETRY_AFTER_FAILURE_SECONDS)})
        return APIError(503, "The model is loading; retry shortly.", "server_error", code="model_loading",
                        headers={"Retry-After": "5"})

    def load(self) -> None:
        with self._lock:
            if self.state == "ready":
                return
            self.state, started = "loading", time.monotonic()
            logger.info("model load start: %s", self.settings.model_repo_id)
            try:
                self.processor, self.model = self._from_pretrained()
                self.streamer_class = build_streamer_class()
                self.flag_stop, self.penalties = build_generation_hooks()
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
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

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


# ----------------------------------------------------------------------------- sessions

class GoneError(Exception):
    """The asked-for events are no longer kept."""


@dataclass
class Event:
    index: int
    data: str


@dataclass
class Outcome:
    status: str = "in_progress"  # in_progress, completed, cancelled, failed, interrupted
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SessionLog:
    """A session's append-only event log, kept in a memory ring buffer.

    The interface generation and SSE code use: append, read(after), follow(after),
    finish, request_cancel / cancel_requested. Appends and reads happen on the event
    loop; the cancel flag is a threading.Event the decode loop polls.
    """

    def __init__(self, session_id: str, capacity: int, next_index: int = 0, outcome: Outcome | None = None):
        self.session_id = session_id
        self.events: deque[Event] = deque(maxlen=capacity)
        self.next_index = next_index
        self.visible = next_index - 1
        self.outcome = outcome or Outcome()
        self.cancel_flag = threading.Event()
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

    def request_cancel(self) -> None:
        self.cancel_flag.set()

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_flag.is_set()

    @property
    def buffer_start(self) -> int:
        """The oldest index still in the ring buffer."""
        return self.events[0].index if self.events else self.next_index

    @property
    def oldest_kept(self) -> int:
        """The oldest index a reader can still get."""
        return self.buffer_start

    async def read(self, after: int) -> list[Event]:
        """Visible events with index > after; GoneError if some of them are no longer kept."""
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
        raise GoneError(f"events after {after} are no longer kept (oldest kept: {first})")

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
    job: "Job | None" = None
    cancel_reason: str = ""
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
        self.log.request_cancel()


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
            raise APIError(409, f"Session '{session_id}' already exists; resume it with Last-Event-ID.",
                           param="session_id", code="session_exists")
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
            raise APIError(429, "Too many sessions in progress.", "rate_limit_exceeded", code="too_many_sessions",
                           headers={"Retry-After": "5"})
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
            raise not_found(f"Session '{session_id}' not found.")
        return session

    def expire(self) -> None:
        cutoff = time.time() - self.settings.sessions_ttl_seconds
        for session in [s for s in self.sessions.values() if s.finished_at and s.finished_at < cutoff]:
            del self.sessions[session.id]
        if self.writer:
            self.writer.submit("DELETE FROM events WHERE session_id IN "
                               "(SELECT id FROM sessions WHERE finished IS NOT NULL AND finished < ?)", (cutoff,))
            self.writer.submit("DELETE FROM sessions WHERE finished IS NOT NULL AND finished < ?", (cutoff,))


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may share a process)."""

    TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def watch(self, state: "AppState") -> None:
        """Gauges read at scrape time from the objects that own the numbers."""
        self.queue_depth.set_function(lambda: state.worker.queued)
        self.running.set_function(lambda: state.worker.running_count)
        self.sessions.set_function(lambda: len(state.sessions.sessions))
        self.listeners.set_function(lambda: sum(s.listeners for s in state.sessions.sessions.values()))
        self.model_load_seconds.set_function(lambda: state.models.load_seconds)
        for name in ("unloaded", "loading", "ready", "error"):
            self.model_state.labels(name).set_function(lambda name=name: float(state.models.state == name))


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


# ----------------------------------------------------------------------------- generation

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


@dataclass(eq=False)
class Job:
    """One generation: prepared inputs in, events out through its CompletionStream."""

    inputs: Any
    params: SamplingParams
    stream: "CompletionStream"
    reasoning: bool
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


class CompletionStream:
    """Turns one generation's deltas into chunk events in the session log.

    The one place that shapes chunks, finish reasons and usage; the non-streaming
    response is assembled from the same events.
    """

    def __init__(self, session: Session, metrics: Metrics, model: str, include_usage: bool, prompt_tokens: int,
                 truncated_messages: int = 0):
        self.session, self.log, self.metrics = session, session.log, metrics
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
        self.metrics.prompt_tokens.inc(outcome.prompt_tokens)
        self.metrics.completion_tokens.inc(outcome.completion_tokens)
        if outcome.status == "cancelled":
            self.metrics.cancellations.labels(self.session.cancel_reason or "unknown").inc()
        self.session.finished_at = time.time()
        self.session.done.set()
        logger.info("session %s %s (%s, %d tokens)", self.session.id, outcome.status,
                    outcome.finish_reason, outcome.completion_tokens)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def eos_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(eos))


def build_streamer_class():
    """TextIteratorStreamer that also counts ids and hands text to a callback, not a queue."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        """Each token's text goes out as soon as it decodes: only a partial UTF-8 character waits.

        The parent holds text ending in symbols until the next space, which delays the
        first token by several steps; keeping one token of context is enough here
        (byte-level BPE decodes prefix-stably), and it keeps each decode O(1).
        """

        def __init__(self, tokenizer, on_text, on_token):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.on_text, self.on_token, self.count, self.last_id = on_text, on_token, 0, None
            rust = getattr(tokenizer, "_tokenizer", None)  # the fast tokenizer's own decode skips Python layers
            self.decode = (lambda ids: rust.decode(ids, skip_special_tokens=True)) if rust is not None else \
                (lambda ids: tokenizer.decode(ids, **self.decode_kwargs))

        def put(self, value):
            if self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            ids = value.reshape(-1).tolist()
            self.count += len(ids)
            self.last_id = ids[-1] if ids else self.last_id
            self.on_token(self.count)
            self.token_cache.extend(ids)
            text = self.decode(self.token_cache)
            if text.endswith("\ufffd"):
                return
            printable = text[self.print_len:]
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.decode(self.token_cache))
            if printable:
                self.on_text(printable)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.on_text(text)

    return CountingStreamer


def build_generation_hooks():
    """The StoppingCriteria and LogitsProcessor classes, defined once transformers is imported."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class FlagStop(StoppingCriteria):
        """Stops within one decode step on cancel, a matched stop string, or the time cap."""

        def __init__(self, job: Job, pipeline: TextPipeline):
            self.job, self.pipeline = job, pipeline

        def __call__(self, input_ids, scores, **kwargs):
            stop = self.job.stream.log.cancel_requested or self.pipeline.stop.stopped or self.job.timed_out
            return (STOP if stop else GO).expand(input_ids.shape[0])

    STOP, GO = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)

    class OpenAIPenalties(LogitsProcessor):
        """logit_bias, then presence/frequency penalties as OpenAI defines them (generated tokens only)."""

        def __init__(self, prompt_len: int, p: SamplingParams):
            self.prompt_len, self.presence, self.frequency = prompt_len, p.presence_penalty, p.frequency_penalty
            self.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            self.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)

        def __call__(self, input_ids, scores):
            if len(self.bias_ids):
                scores = scores.clone()
                scores[:, self.bias_ids.to(scores.device)] += self.bias_values.to(scores.device, scores.dtype)
            generated = input_ids[:, self.prompt_len:]
            if generated.shape[1] == 0 or not (self.presence or self.frequency):
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence

    return FlagStop, OpenAIPenalties


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
            raise APIError(429, "The server is busy; retry shortly.", "rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": "2"})
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
        job.stream.finish("cancelled", 0)
        return True

    def stop(self) -> None:
        self.jobs.put(None)

    # -- the decode loop (worker thread)

    def _run(self) -> None:
        import torch

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
            self._fail(row.job, row.streamer.count, exc)
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
                budget -= job.stream.prompt_tokens
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

    def _new_row(self, job: Job) -> "Row":
        import torch

        pipeline = TextPipeline(job.params.stop, job.reasoning)
        streamer = self.models.streamer_class(self.models.processor.tokenizer,
                                              lambda text: self._emit(job, pipeline.feed(text)),
                                              lambda count: self._on_token(job, count))
        streamer.next_tokens_are_prompt = False
        seed = job.params.seed if job.params.seed is not None else secrets.randbits(63)
        p = job.params
        penalties = self.models.penalties(job.inputs["input_ids"].shape[1], p) \
            if p.presence_penalty or p.frequency_penalty or p.logit_bias else None
        return Row(job, streamer, pipeline, self.models.flag_stop(job, pipeline), penalties,
                   torch.Generator().manual_seed(seed),
                   job.inputs["input_ids"].to(self.models.model.device) if penalties else None)

    def _decode_step(self) -> None:
        rows = list(self.batch.rows)
        self.metrics.batch_size.observe(len(rows))
        try:
            logits = self.batch.forward(self.models.model)
            self._advance(rows, self._pick(rows, logits))
        except Exception as exc:  # a failed forward leaves no row in a known state
            logger.exception("generation worker: decode step failed")
            self._fail_all(exc)

    def _pick(self, rows: list["Row"], logits) -> list[int]:
        """Each row's own logits rules, then sampling in groups of rows that sample alike."""
        import torch

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

    def _adjust(self, row: "Row", scores):
        """EOS masked until min_tokens; logit_bias and OpenAI penalties."""
        if row.generated < row.job.params.min_tokens:
            scores = scores.clone()
            scores[self.models.eos_ids] = float("-inf")
        if row.penalties is not None:
            scores = row.penalties(row.ids, scores[None])[0]
        return scores

    def _advance(self, rows: list["Row"], tokens: list[int]) -> None:
        """Stream each row's new token and retire the rows that are done."""
        done = set()
        for row, token in zip(rows, tokens):
            try:
                reason = self._accept(row, token)
            except Exception as exc:  # a bug in one row's text handling fails that row only
                self._fail(row.job, row.streamer.count, exc)
                done.add(row)
                continue
            if reason:
                self._finish(row, reason)
                done.add(row)
        if done:
            self.batch.drop(done)

    def _accept(self, row: "Row", token: int) -> str | None:
        import torch

        row.generated += 1
        row.last = token
        token_ids = torch.tensor([[token]])
        if row.ids is not None:
            row.ids = torch.cat([row.ids, token_ids.to(row.ids.device)], dim=1)
        row.streamer.put(token_ids)
        return self._finish_reason(row, token, bool(row.flag_stop(token_ids, None)[0]))

    def _finish_reason(self, row: "Row", token: int, flagged: bool) -> str | None:
        if flagged and row.pipeline.stop.stopped:
            return "stop"
        if flagged and row.job.stream.log.cancel_requested:
            return "cancelled"
        if flagged:
            return "timeout"
        if token in self.models.eos_ids:
            return "stop"
        return "length" if row.generated >= row.job.params.max_new_tokens else None

    def _finish(self, row: "Row", reason: str) -> None:
        row.streamer.end()
        self._emit(row.job, row.pipeline.flush())
        self.outbox.post(row.job, "finish", reason, row.streamer.count)

    def _fail(self, job: Job, tokens: int, exc: Exception) -> None:
        logger.error("session %s generation failed: %s", job.stream.session.id, type(exc).__name__, exc_info=exc)
        self.outbox.post(job, "fail", f"Generation failed: {type(exc).__name__}.", tokens)

    def _on_token(self, job: Job, count: int) -> None:
        now = time.monotonic()
        if count == 1:
            self.metrics.ttft.observe(now - job.stream.session.started)
        else:
            self.metrics.token_latency.observe(now - job.last_token_at)
        job.last_token_at = now

    def _emit(self, job: Job, pieces: list[tuple[str, str]]) -> None:
        if pieces:
            self.outbox.post(job, "deltas", pieces)


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

    def post(self, job: Job, kind: str, *args) -> None:
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
                job.stream.deltas(pending.pop(job))
            getattr(job.stream, kind)(*args)  # finish or fail: the job's slot is free again
            self.release()
        for job, pieces in pending.items():
            job.stream.deltas(pieces)


@dataclass(eq=False)
class Row:
    """One request inside the running batch."""

    job: Job
    streamer: Any
    pipeline: TextPipeline
    flag_stop: Any
    penalties: Any
    generator: Any
    ids: Any  # prompt + generated ids, kept only when penalties need them
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
        import torch

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
        import torch

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
        import torch

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
    import torch

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
    import torch
    from transformers import DynamicCache

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
    import torch

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


# ----------------------------------------------------------------------------- SSE

SHUTDOWN_GRACE_SECONDS = 5.0
LAST_EVENT_ID = re.compile(r"^(?P<sid>[A-Za-z0-9._-]{1,128}):(?P<idx>-?\d{1,18})$")


def parse_last_event_id(request: Request) -> tuple[str, int] | None:
    """The resume point from the Last-Event-ID header, else the last_event_id query."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None:
        return None
    match = LAST_EVENT_ID.match(raw.strip())
    if not match or int(match["idx"]) < -1:
        raise invalid("Last-Event-ID must look like '<session_id>:<index>'.", "Last-Event-ID", "invalid_last_event_id")
    return match["sid"], int(match["idx"])


def sse_response(app_state: "AppState", session: Session, after: int) -> EventSourceResponse:
    """A reader of the session's log: replay after `after`, then follow live events."""
    if after > session.log.visible:
        raise invalid(f"Index {after} is beyond the session's last event.", "Last-Event-ID", "invalid_last_event_id")
    if after + 1 < session.log.oldest_kept:
        raise APIError(410, f"Events after {after} are no longer kept.", param="Last-Event-ID", code="events_expired")
    settings = app_state.settings
    server_exit = anyio.Event()  # set by sse-starlette when uvicorn starts shutting down

    async def events():
        session.attach()
        watcher = asyncio.ensure_future(stop_on_exit(server_exit, app_state))
        try:
            async for event in session.log.follow(after):
                yield {"id": f"{session.id}:{event.index}", "data": event.data}
        except GoneError:  # this reader fell a whole buffer behind; a reconnect gets 410
            logger.warning("session %s reader fell behind the ring buffer", session.id)
        finally:
            watcher.cancel()
            session.detach(settings.cancel_after_disconnect_seconds)

    return EventSourceResponse(events(), ping=settings.sse_ping_seconds, send_timeout=settings.sse_send_timeout_seconds,
                               shutdown_event=server_exit, shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
                               headers={"X-Session-Id": session.id, "Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})


async def stop_on_exit(server_exit: anyio.Event, state: "AppState") -> None:
    """On shutdown, end generations so open streams get their final event and [DONE]."""
    await server_exit.wait()
    await stop_generations(state)


async def assemble_completion(session: Session, model: str) -> dict:
    """The chat.completion a drained stream adds up to, with the session's status."""
    try:
        events = await session.log.read(-1)
    except GoneError:
        raise APIError(410, "This session's events are no longer kept.", code="events_expired") from None
    text = {"content": [], "reasoning_content": []}
    chunk_id, created, error, truncated = f"chatcmpl-{session.id}", session.created, None, 0
    for event in events:
        if event.data == "[DONE]":
            continue
        chunk = json.loads(event.data)
        error = chunk.get("error", error)
        truncated = chunk.get("truncated_messages", truncated)
        chunk_id, created = chunk.get("id", chunk_id), chunk.get("created", created)
        for choice in chunk.get("choices", []):
            for name, parts in text.items():
                parts.append(choice["delta"].get(name) or "")
    outcome = session.log.outcome
    message = {"role": "assistant", "content": "".join(text["content"]),
               "reasoning_content": "".join(text["reasoning_content"]) or None}
    body = {"id": chunk_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish_reason}],
            "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                      "total_tokens": outcome.prompt_tokens + outcome.completion_tokens},
            "session_id": session.id, "status": outcome.status}
    if truncated:
        body["truncated_messages"] = truncated
    if error:
        body["error"] = error
    return body


# ----------------------------------------------------------------------------- routes

@dataclass
class AppState:
    settings: Settings
    models: ModelManager
    sessions: SessionRegistry
    worker: Worker
    writer: SQLiteWriter | None
    metrics: Metrics
    shutting_down: bool = False


def state_of(request: Request) -> AppState:
    return request.app.state.server


async def prepare_job(state: AppState, req: ChatCompletionRequest, session: Session) -> Job:
    """Fetch media, then decode it, apply the chat template and tokenize in one trip to the pool."""
    messages = await load_media(req, state.settings)
    prompt, inputs, dropped = await off_loop(build_inputs, messages, state.settings, state.models.processor,
                                             state.models.context_length)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    params = sampling_params(req, state.settings, prompt_tokens, state.models.context_length,
                             state.models.model.config.text_config.vocab_size)
    stream = CompletionStream(session, state.metrics, state.settings.model_name,
                              bool(req.stream_options and req.stream_options.include_usage), prompt_tokens, dropped)
    return Job(inputs, params, stream, reasoning=prompt.rstrip().endswith(ReasoningSplitter.OPEN))


def tokenize(processor, messages: list[PromptMessage]):
    """(prompt text, processor inputs) for the messages and their media, in order."""
    prompt = processor.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                           tokenize=False, add_generation_prompt=True)
    images = [image for m in messages for image in m.images]
    videos = [video for m in messages for video in m.videos]
    kwargs = {"video_metadata": [v for m in messages for v in m.video_metadata], "do_sample_frames": False} \
        if videos else {}
    return prompt, processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt",
                             **kwargs)


def build_inputs(messages: list[PromptMessage], settings: Settings, processor, context: int):
    """Decode media and tokenize (blocking); over the context, 400 or (CONTEXT_OVERFLOW=truncate)
    drop the oldest non-system turns with their media. Returns (prompt, inputs, dropped)."""
    for message in messages:
        message.decode(settings)
    dropped = 0
    while True:
        prompt, inputs = tokenize(processor, messages)
        tokens = int(inputs["input_ids"].shape[1])
        if tokens < context:
            return prompt, inputs, dropped
        droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
        if settings.context_overflow != "truncate" or not droppable:
            raise invalid(f"The prompt is {tokens} tokens; the model's context is {context}.", "messages",
                          "context_length_exceeded")
        del messages[droppable[0]]
        dropped += 1


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


async def read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("The body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.", None, "invalid_json")
    return body


def validate_request(body: dict) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise invalid(f"{param}: {first['msg']}", param, "invalid_value") from None


async def resume(state: AppState, request: Request, session_id: str | None, point: tuple[str, int]) -> Any:
    sid, after = point
    if session_id and session_id != sid:
        raise invalid("Last-Event-ID names another session than the path or body.", "Last-Event-ID",
                      "invalid_last_event_id")
    session = await state.sessions.get(sid)
    logger.info("session %s resume after %d", sid, after)
    state.metrics.resumes.inc()
    return sse_response(state, session, after)


async def start_session(state: AppState, req: ChatCompletionRequest) -> Session:
    """Admit, reserve the id, prepare and submit; every refusal comes before media is decoded."""
    if state.shutting_down:
        raise APIError(503, "The server is shutting down.", "server_error", code="shutting_down",
                       headers={"Retry-After": "10"})
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
    job.stream.start()
    session.job = job
    state.worker.submit(job)
    session.arm_auto_cancel(state.settings.cancel_after_disconnect_seconds)
    logger.info("session %s start (prompt %d tokens, max %d, stream=%s)", session.id,
                job.stream.prompt_tokens, job.params.max_new_tokens, req.stream)
    return session


def request_body_schema() -> dict:
    """ChatCompletionRequest's JSON schema with $refs inlined (the body is parsed by hand, for resume)."""
    schema = ChatCompletionRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            return inline(defs[node["$ref"].rsplit("/", 1)[1]]) if "$ref" in node else \
                {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def register_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> dict:
        models = state_of(request).models
        state = {"unloaded": "loading", "loading": "loading"}.get(models.state, models.state)
        return {"status": state, "model": state_of(request).settings.model_name,
                "error": models.error or None}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        name = state_of(request).settings.model_name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": request_body_schema()}}}})
    async def chat_completions(request: Request) -> Any:
        state = state_of(request)
        body = await read_json(request)
        point = parse_last_event_id(request)
        if point is not None:
            sid = body.get("session_id")
            return await resume(state, request, sid if isinstance(sid, str) else None, point)
        req = validate_request(body)
        refuse_unsupported(req)
        session = await start_session(state, req)
        if req.stream:
            return sse_response(state, session, -1)
        return await wait_for_completion(state, session)

    @app.get("/v1/chat/completions/{session_id}")
    async def get_completion(request: Request, session_id: str, stream: bool = False) -> Any:
        state = state_of(request)
        point = parse_last_event_id(request)
        session = await state.sessions.get(session_id)
        if stream:
            return await resume(state, request, session_id, point or (session_id, -1))
        return JSONResponse(await assemble_completion(session, state.settings.model_name),
                            headers={"X-Session-Id": session.id})

    @app.post("/v1/cancel/{session_id}")
    async def cancel(request: Request, session_id: str) -> dict:
        state = state_of(request)
        session = await state.sessions.get(session_id)
        if not session.done.is_set():
            logger.info("session %s cancel requested", session_id)
            session.cancel("manual")
            if session.job is None or not state.worker.cancel_waiting(session.job):
                await wait_briefly(session.done, 5.0)
        return {"id": session_id, "object": "session", "status": session.log.outcome.status}


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
    body = await assemble_completion(session, state.settings.model_name)
    if body["status"] == "failed":
        raise APIError(500, body["error"]["message"], "server_error", code="generation_failed")
    return JSONResponse(body, headers={"X-Session-Id": session.id})


STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page's own files only: no inline script or style, nothing from other origins, so a
# bug in the page's markdown renderer still could not run injected script (D38).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def web_page() -> Response:
    from fastapi.responses import FileResponse

    return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=PAGE_HEADERS)


def register_web_ui(app: FastAPI) -> None:
    """The chat page at / and its files under /static/ (WEB_UI=1): same origin as the API, so no CORS."""
    from fastapi.staticfiles import StaticFiles

    app.add_api_route("/", web_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ----------------------------------------------------------------------------- app factory

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


READ_TOKEN_PATH = re.compile(r"^/v1/chat/completions/(?P<sid>[^/]+)$")
READ_TOKEN_IN_LOG = re.compile(r"(read_token=)[^&\s]+")


def read_token(key: bytes, session_id: str) -> str:
    """The read-only credential for one session: HMAC-SHA256 of its id under the API key (D37)."""
    return hmac.new(key, b"qwen-read-token:v1:" + session_id.encode(), hashlib.sha256).hexdigest()


class APIKeyMiddleware:
    """Pure ASGI: `Authorization: Bearer <key>` on every /v1 route when API_KEY is set.

    A response naming a session (X-Session-Id) carries its read token (X-Read-Token);
    `?read_token=` alone opens `GET /v1/chat/completions/{id}` (result and stream) for
    that one session, for EventSource clients that cannot send headers (D37)."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        # compare against every key so timing does not tell which one nearly matched
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        if not any(matches):
            matches = self.read_token_matches(scope)
        if not any(matches):
            return await send_error(send, 401, error_body("Missing or invalid API key.", "invalid_request_error",
                                                          None, "invalid_api_key"),
                                    [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, with_read_token(send, self.keys[matches.index(True)]))

    def read_token_matches(self, scope) -> list[bool]:
        """Which keys the `read_token` query was made with; only on the session's GET route."""
        path = READ_TOKEN_PATH.match(scope["path"])
        given = parse_qs(scope["query_string"].decode("latin-1")).get("read_token", [""])[0].encode()
        if scope["method"] != "GET" or not path or not given:
            return [False] * len(self.keys)
        return [hmac.compare_digest(given, read_token(key, path["sid"]).encode()) for key in self.keys]


def with_read_token(send, key: bytes):
    """Adds X-Read-Token to a response that names its session in X-Session-Id."""
    async def send_with_token(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            sid = next((v for k, v in headers if k.lower() == b"x-session-id"), None)
            if sid:
                token = read_token(key, sid.decode("latin-1"))
                message["headers"] = [*headers, (b"x-read-token", token.encode())]
        await send(message)
    return send_with_token


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {first['msg']}", "invalid_request_error", param, "invalid_value"),
                            400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, kind if exc.status_code == 404 else None),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_var.get()
        logger.exception("request %s failed", rid)
        return JSONResponse(error_body(f"Internal server error (request id {rid}).", "server_error", None,
                                       "internal_error"), 500)


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
                     writer, metrics)
    metrics.watch(state)
    app.state.server = state
    if settings.preload_model:
        asyncio.ensure_future(asyncio.to_thread(models.load))
    sweeper = asyncio.ensure_future(sweep_sessions(state))
    yield
    sweeper.cancel()
    await shutdown(state)


async def sweep_sessions(state: AppState) -> None:
    interval = max(1.0, min(60.0, state.settings.sessions_ttl_seconds / 2))
    while True:
        await asyncio.sleep(interval)
        state.sessions.expire()


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
    register_error_handlers(app)
    register_routes(app)
    if settings.web_ui:
        register_web_ui(app)
    add_middleware(app, settings)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost last: CORS answers preflights, then metrics, request ids, body limit, API keys."""
    keys = [k.strip() for k in settings.api_key.split(",") if k.strip()]
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"],
                           expose_headers=["X-Session-Id", "X-Request-Id", "X-Read-Token"])


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class ReadTokenRedactor(logging.Filter):
    """uvicorn's access log prints query strings; a read token there is replaced by *** (D37)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(READ_TOKEN_IN_LOG.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def configure_logging(level: str) -> None:
    """Lifecycle logs carry the request id; bodies, media, keys and tokens are never logged."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ReadTokenRedactor) for f in access.filters):
        access.addFilter(ReadTokenRedactor())


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host=app.state.settings.host, port=app.state.settings.port,
                log_level=app.state.settings.log_level)
