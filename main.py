"""OpenAI-compatible chat server for Qwen/Qwen3-VL-2B-Thinking on Hugging Face Transformers.

What it promises
- `POST /v1/chat/completions` takes OpenAI chat messages with text, images and videos and
  answers with a `chat.completion` or, with `stream: true`, SSE `chat.completion.chunk`
  events ending in `data: [DONE]`. The model's reasoning (everything before `</think>`)
  is `reasoning_content` (and `reasoning`); the answer after it is `content`.
- `response_format` json_object / json_schema and a forced tool call (`tool_choice`
  required or named) are enforced by constrained decoding once `</think>` has come: the
  answer matches the schema unless max_tokens (finish_reason "length"), a stop string or
  a cancel cuts it. Tool calls are parsed out of the model's `<tool_call>` blocks into
  OpenAI `tool_calls` (finish_reason "tool_calls"). `max_reasoning_tokens` /
  `reasoning_effort` cap the thinking: `</think>` is forced, so the answer still comes.
- Generation never depends on a client being connected. Each request becomes a
  *session*: the generation worker writes events to the session's log, HTTP responses
  only read it. A client that drops reconnects with `Last-Event-ID` and misses nothing.

Invariants of a session log (tested)
- Event indexes start at 0 and increase by exactly 1; every SSE event carries
  `id: <session_id>:<index>`, `[DONE]` included, and `[DONE]` is the last event.
- A reader that resumes after index k gets exactly the events with index > k, in order,
  with no gap and no duplicate, also at the seam between replay and live events.
- With `SESSION_STORE=sqlite` readers only see events already committed to SQLite, so a
  crash can never take back an event a client has seen; sessions that were generating
  when the process died are closed on restart as `interrupted`.
- With `SESSION_STORE=redis` several replicas share sessions: any replica serves any
  stream, resume, GET, cancel or delete; the owner's readers see only what Redis
  acknowledged (unless REDIS_LOCAL_FALLBACK covers an outage); a replica that dies is
  noticed after its lease and its sessions end as `interrupted`, once.
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
   constrained   grammars (response_format, forced tool calls), row masks, reasoning budget
   model         loading the model and processor
   text pipeline stop strings, the reasoning split, tool-call parsing
   metrics       Prometheus metrics
   engine        jobs, detokenizer, stopping, penalties, batch, decode loop, outbox
   event shapers chat chunks (GenerationSink) and the non-streamed body
   sessions      session logs (memory ring, SQLite, Redis), sessions, the registry
   http          SSE, request handling, routes, the error table
   middleware    pure ASGI: request ids, body limit, API keys, metrics
   app           lifespan, shutdown, create_app, __main__
"""

from __future__ import annotations

import asyncio
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
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Protocol
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import anyio
import av
import httpx
import llguidance
import llguidance.hf
import numpy as np
import pybase64
import redis
import redis.asyncio as aioredis
import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache
from transformers.video_utils import VideoMetadata
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        0, ge=0, description="Prompt tokens prefilled between two decode steps; a longer prompt is prefilled in "
                             "chunks, interleaved with decode steps. 0 = auto: 64 on CPU, 512 on CUDA.")
    compile: Literal["auto", "0", "1"] = Field(
        "auto", description="Compile the decode step (torch.compile, CUDA graphs on GPU) at model load: "
                            "1 on, 0 off, auto on where it helps (CUDA).")
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
    session_store: Literal["memory", "sqlite", "redis"] = Field(
        "memory", description="Where session logs live: memory, sqlite (one process) or redis (shared by replicas).")
    persist_sessions: bool = Field(
        False, description="Old name of SESSION_STORE=sqlite (used when SESSION_STORE is not set).")
    sessions_db_path: str = Field("data/sessions.db", description="SQLite file used when SESSION_STORE=sqlite.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis used when SESSION_STORE=redis.")
    replica_id: str = Field(
        "", description="This replica's name in Redis; empty means host-pid-random, fresh at every start.")
    redis_lease_seconds: float = Field(
        5.0, gt=0, description="A replica silent this long is gone: its running sessions end as interrupted.")
    redis_local_fallback: bool = Field(
        True, description="While Redis is down (1 s+), the owner's own readers keep streaming unconfirmed events.")
    cancel_after_disconnect_seconds: float = Field(
        3600.0, ge=0, description="Cancel a generation nobody has listened to for this long; 0 disables.")
    stream_interval_ms: float = Field(
        10.0, ge=0, description="Least time between two deliveries of new tokens to streams; 0 sends every step.")
    sse_ping_seconds: float = Field(15.0, gt=0, description="Interval of SSE keep-alive comments.")
    sse_send_timeout_seconds: float = Field(
        30.0, gt=0, description="A client that accepts no bytes this long is dropped.")
    web_ui: bool = Field(True, description="Serve the chat page at / (files in static/); 0 for API-only deployments.")
    request_head_timeout_seconds: float = Field(
        10.0, gt=0, description="A connection that has not sent a whole request head this long is closed.")
    request_body_timeout_seconds: float = Field(
        60.0, gt=0, description="A request body that has not all arrived this long gets 408.")
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
    reasoning_fields: CommaList = Field(
        ["reasoning_content", "reasoning"],
        description="Chat fields that carry the reasoning (reasoning_content, reasoning); empty sends none.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("allowed_media_domains", "api_key", "cors_allow_origins", "reasoning_fields", mode="before")
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

    @field_validator("reasoning_fields", mode="after")
    @classmethod
    def _reasoning_fields(cls, value: list[str]) -> list[str]:
        unknown = set(value) - {"reasoning_content", "reasoning"}
        if unknown:
            raise ValueError(f"REASONING_FIELDS: unknown field {sorted(unknown)[0]!r}")
        return value

    @field_validator("allowed_media_domains", mode="after")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [d.lower().lstrip(".") for d in value]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_repo_id

    @property
    def store(self) -> str:
        """The session store in use: PERSIST_SESSIONS=1 still means sqlite when SESSION_STORE is not set."""
        if self.persist_sessions and "session_store" not in self.model_fields_set:
            return "sqlite"
        return self.session_store

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
    """No session with that id (never created, expired, deleted, or another key's)."""


class ModelNotFound(DomainError):
    """A model id this server does not serve."""


class EventsGone(DomainError):
    """The asked-for events are no longer kept."""


class GenerationFailed(DomainError):
    """The generation ended with an error (reported to a non-streamed caller)."""


class StoreUnavailable(DomainError):
    """The session store (SQLite, Redis) cannot take or give what is asked now."""


class GrammarError(DomainError):
    """A response_format schema or tool parameters that constrained decoding cannot compile;
    param names the request field."""



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


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict = "{}"  # OpenAI sends the JSON text; an object is accepted too


class ToolCall(BaseModel):
    """A call an assistant turn made, as the client sends its history back."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns
    reasoning_content: str | None = None  # an assistant turn's reasoning (the template keeps it in a tool loop)
    reasoning: str | None = None  # the same, under the other name this server sends it as


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule; names are also written into grammars


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema; none means the function takes no arguments
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # none means any JSON object
    strict: bool | None = None  # false is enforced too: the grammar can only help (D51)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


# reasoning_effort as the most reasoning tokens before `</think>` is forced (D53); None: no cap
REASONING_EFFORT_TOKENS: dict[str, int | None] = {
    "none": 0, "minimal": 64, "low": 256, "medium": 1024, "high": 4096, "xhigh": 16384, "max": None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request body plus vLLM's min_tokens/ignore_eos and our session_id and
    max_reasoning_tokens.

    A top-level `null` means the field's default (the OpenAI SDK sends null for None).
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 keeps only the most probable token
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64 (as vLLM): seed + choice stays a torch seed
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1)  # at most MAX_BATCH_SIZE (check_choices)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    session_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)  # wins over reasoning_effort; 0 skips thinking
    # Known OpenAI fields this server cannot honour yet: refused, never ignored.
    functions: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value

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
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true.", "top_logprobs", "invalid_value")
    if req.functions:  # the legacy form of tools
        raise invalid("'functions' is not supported by this server; use tools.", "functions", "unsupported_parameter")
    check_tool_choice(req)
    for i, message in enumerate(req.messages):
        if message.role == "user" and not message.content:
            raise invalid("User messages need content.", f"messages.{i}.content", "invalid_value")


def check_choices(req: ChatCompletionRequest, settings: Settings) -> None:
    """n choices decode as n rows of one batch, so n is bounded by MAX_BATCH_SIZE."""
    if req.n > settings.max_batch_size:
        raise invalid(f"n may be at most {settings.max_batch_size} (MAX_BATCH_SIZE).", "n", "invalid_value")


def check_tool_choice(req: ChatCompletionRequest) -> None:
    """A forced call must be possible: "required" needs a tool, a named one must be in tools."""
    names = [tool.function.name for tool in req.tools or []]
    if req.tool_choice == "required" and not names:
        raise invalid("tool_choice 'required' needs at least one tool.", "tool_choice", "invalid_value")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise invalid(f"tool_choice names the function '{req.tool_choice.function.name}', which is not in tools.",
                      "tool_choice", "invalid_value")


def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template shows the model; none with tool_choice "none" (D52)."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in req.tools]


def validate_request(body: dict, schema: type[BaseModel] = ChatCompletionRequest) -> Any:
    """The body as `schema`, or a 400 naming the first bad field."""
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise invalid(f"{param}: {first['msg']}", param, "invalid_value") from None



class ResponseText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ResponseImage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


class ResponseVideo(BaseModel):
    """Our extension: `{"type": "input_video", "video_url": ...}`."""

    type: Literal["input_video"]
    video_url: str


ResponseContentPart = Annotated[ResponseText | ResponseImage | ResponseVideo, Field(discriminator="type")]


class ResponseInputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ResponseContentPart]


class ResponseFunctionCall(BaseModel):
    """A call the model made in an earlier turn, sent back as input."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class ResponseFunctionCallOutput(BaseModel):
    """What the client's function returned for a call."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ResponseContentPart]
    id: str | None = None
    status: str | None = None


class ResponseReasoningItem(BaseModel):
    """An earlier turn's reasoning sent back as input (`input += response.output`): accepted,
    and not rendered, like the reasoning of earlier chat turns (D37)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning"]
    id: str | None = None


def input_item_type(value: Any) -> str:
    """A message may leave out its type (OpenAI's EasyInputMessage)."""
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


ResponseInputItem = Annotated[
    Annotated[ResponseInputMessage, Tag("message")] | Annotated[ResponseFunctionCall, Tag("function_call")]
    | Annotated[ResponseFunctionCallOutput, Tag("function_call_output")]
    | Annotated[ResponseReasoningItem, Tag("reasoning")],
    Discriminator(input_item_type)]


class ResponsesRequest(BaseModel):
    """OpenAI's Responses API body (the parts this server serves) plus `seed`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[ResponseInputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    ignore_eos: bool = False  # vLLM's extensions, as on chat
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[int, float] | None = None
    stream: bool | None = False
    background: bool | None = False
    store: bool | None = True
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    truncation: Literal["auto", "disabled"] | None = None
    text: dict | None = None
    reasoning: dict | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)  # extension, as on chat
    parallel_tool_calls: bool | None = None
    tools: list | None = None  # function tools only (refuse_unsupported_response)
    tool_choice: Any = None
    # Known fields this server cannot honour yet: refused, never ignored.
    include: list[str] | None = None
    conversation: Any = None


RESPONSES_INCLUDE = {"reasoning.encrypted_content"}  # accepted, and meaningless here: reasoning is sent as text


def refuse_unsupported_response(req: ResponsesRequest) -> None:
    """A known Responses field we cannot honour is a 400 naming it, never silently ignored.
    The shapes of tools, tool_choice and text.format are checked again as chat fields."""
    if any(not isinstance(tool, dict) or tool.get("type") != "function" for tool in req.tools or []):
        raise invalid("Only function tools are supported.", "tools", "unsupported_parameter")
    if not (req.tool_choice in (None, "none", "auto", "required") or function_choice(req.tool_choice)):
        raise invalid("tool_choice may be none, auto, required or {type: function, name}.", "tool_choice",
                      "unsupported_parameter")
    if req.conversation is not None:
        raise invalid("'conversation' is not supported; use previous_response_id.", "conversation",
                      "unsupported_parameter")
    unknown = sorted(set(req.include or []) - RESPONSES_INCLUDE)
    if unknown:
        raise invalid(f"'include' value {unknown[0]!r} is not supported.", "include", "unsupported_parameter")
    if not isinstance(text_format(req), dict) or text_format(req).get("type") not in RESPONSE_FORMATS:
        raise invalid("text.format may be text, json_object or json_schema.", "text.format", "unsupported_parameter")
    if req.background and req.store is False:
        raise invalid("A background response must be stored (store: true).", "store", "invalid_value")


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def text_format(req: ResponsesRequest) -> Any:
    return (req.text or {}).get("format") or {"type": "text"}


def function_choice(choice: Any) -> str | None:
    """The function a Responses tool_choice names (`{"type": "function", "name": ...}`), if any."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return choice["name"]
    return None


def response_input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's input as chat messages (the prompt pipeline's language): a call the
    model made joins the assistant turn before it, a call's output is a tool turn, and
    reasoning sent back is left out."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict] = []
    for item in req.input:
        if isinstance(item, ResponseInputMessage):
            messages.append({"role": item.role, "content": chat_content(item.content)})
        elif isinstance(item, ResponseFunctionCall):
            add_tool_call(messages, {"id": item.call_id, "type": "function",
                                     "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, ResponseFunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": chat_content(item.output)})
    return messages


def chat_content(content: str | list) -> str | list[dict]:
    return content if isinstance(content, str) else [chat_part(part) for part in content]


def add_tool_call(messages: list[dict], call: dict) -> None:
    """Append a call to the assistant turn that ends the messages, or start one."""
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": None})
    messages[-1].setdefault("tool_calls", []).append(call)


def chat_part(part: ResponseText | ResponseImage | ResponseVideo) -> dict:
    if isinstance(part, ResponseText):
        return {"type": "text", "text": part.text}
    if isinstance(part, ResponseImage):
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail}}
    return {"type": "video_url", "video_url": {"url": part.video_url}}


def chat_request_of(req: ResponsesRequest, history: list[dict]) -> ChatCompletionRequest:
    """The chat request a response runs as: instructions, earlier turns, then this input;
    tools, tool_choice, text.format and reasoning.effort in their chat shapes."""
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body = {"messages": system + history + response_input_messages(req), "max_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stream": bool(req.stream),
            "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens, "logit_bias": req.logit_bias,
            "tools": [chat_tool(tool) for tool in req.tools] if req.tools else None,
            "tool_choice": chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls is not False,
            "response_format": chat_response_format(text_format(req)),
            "reasoning_effort": (req.reasoning or {}).get("effort"), "max_reasoning_tokens": req.max_reasoning_tokens}
    return validate_request(body)


def chat_tool(tool: dict) -> dict:
    """Responses' flat function tool as a chat tool."""
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def chat_tool_choice(choice: Any) -> Any:
    name = function_choice(choice)
    return {"type": "function", "function": {"name": name}} if name is not None else choice


def chat_response_format(fmt: dict) -> dict:
    """Responses' text.format (flat: type, name, schema, strict) as a chat response_format."""
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type", "text")}
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                   if k in fmt}}


INPUT_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_items(req: ResponsesRequest) -> list[dict]:
    """The input as the items `GET /v1/responses/{id}/input_items` lists (an item's own id kept)."""
    items = req.input
    if isinstance(items, str):
        items = [ResponseInputMessage(role="user", content=[ResponseText(type="input_text", text=items)])]
    return [{"id": f"{INPUT_ITEM_PREFIX[item.type]}_{uuid.uuid4().hex}", "status": "completed",
             **item.model_dump(exclude_none=True)} for item in items]


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


async def fetch_media(url: str, settings: Settings, param: str, limit: int) -> bytes | str:
    """Bytes behind an allowed local path or an http(s) URL on a public address. A data URI
    comes back as its base64 payload, checked but still encoded: the media pool decodes it
    together with the image, so the event loop never spends the 1-2 ms a 270 KB image's
    base64 takes (#14)."""
    if url.startswith("data:"):
        return data_uri_payload(url, param, limit)
    if url.startswith(("http://", "https://")):
        return await fetch_http(url, settings, param, limit)
    if settings.allowed_local_media_path:
        return await asyncio.to_thread(read_local_media, url, settings.allowed_local_media_path, param, limit)
    raise invalid("Media URLs must be http(s) URLs or data URIs.", param, "invalid_media_url")


def data_uri_payload(url: str, param: str, limit: int) -> str:
    """The base64 payload of a data URI; the size it decodes to is known from its length, so
    one over the limit is refused (413) before any decoding."""
    header, comma, payload = url.partition(",")  # only the short header goes through the regex
    if not comma or not DATA_URI_HEADER.match(header):
        raise invalid("Data URIs must be base64 encoded: data:<mime>;base64,<data>.", param, "invalid_data_uri")
    if len(payload) // 4 * 3 - payload.endswith("=") - payload.endswith("==") > limit:
        raise too_large(f"Media is larger than {limit} bytes.", param, "media_too_large")
    return payload


def decode_base64(payload: str, param: str) -> bytes:
    try:
        return strict_b64decode(payload)
    except (binascii.Error, ValueError):
        raise invalid("The data URI holds invalid base64.", param, "invalid_data_uri") from None


def strict_b64decode(text: str) -> bytes:
    """Base64 with nothing outside its alphabet and padding only at the end: exactly what
    b64decode(validate=True) accepts. pybase64's SIMD decoder takes ~0.02 ms for a 640x480
    JPEG's 360 KB where binascii takes ~1 ms (D75); it also refuses superfluous padding
    (`QUJD=`), which binascii accepts, so binascii has the last word on what it refuses."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return binascii.a2b_base64(text, strict_mode=True)


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
            data = strict_b64decode(chunks[i])
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
    extra: dict = field(default_factory=dict)  # tool_calls, tool_call_id, reasoning_content, for the template
    fetched: list[tuple[str, Any, str]] = field(default_factory=list)  # (kind, bytes, base64 or frame list, param)
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_metadata: list = field(default_factory=list)

    def decode(self, settings: Settings, budget: DecodeBudget) -> None:
        """Fetched media to PIL images and sampled video frames (blocking; media pool)."""
        for kind, data, param in self.fetched:
            budget.check(param)
            if isinstance(data, str):  # a data URI's payload (fetch_media)
                data = decode_base64(data, param)
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
        if not isinstance(message.content, list):  # null content (an assistant turn that only calls) is ""
            out.append(PromptMessage(role, message.content or "", template_extra(message)))
            continue
        prompt = PromptMessage(role, [], template_extra(message))
        for j, part in enumerate(message.content):
            await load_part(part, prompt, settings, f"messages.{i}.content.{j}")
        out.append(prompt)
    return out


def template_extra(message: Message) -> dict:
    """What a message gives the chat template besides role and content, in the names Qwen's
    template reads: an assistant turn's calls and reasoning, a tool turn's call id."""
    extra: dict[str, Any] = {}
    if message.tool_calls:
        extra["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
    if message.tool_call_id is not None:
        extra["tool_call_id"] = message.tool_call_id
    reasoning = message.reasoning_content or message.reasoning
    if reasoning and message.role == "assistant":
        extra["reasoning_content"] = reasoning
    return extra


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
    work = partial(build_inputs, messages, settings, processor, context, cancel, template_tools(req))
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


def tokenize(processor, messages: list[PromptMessage], settings: Settings, tools: list[dict] | None = None):
    """(prompt text, processor inputs) for the messages, their media and the tools, in order."""
    prompt = processor.apply_chat_template([{"role": m.role, "content": m.content, **m.extra} for m in messages],
                                           tools=tools, tokenize=False, add_generation_prompt=True)
    images = [image for m in messages for image in m.images]
    videos = [video for m in messages for video in m.videos]
    image_size, video_size = vision_sizes(processor, settings)
    kwargs: dict[str, Any] = {}
    if images:  # decode_image made them RGB: the processor's own conversion would copy each again (~0.3 ms)
        kwargs["images_kwargs"] = {"size": image_size, "do_convert_rgb": False}
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
                 cancel: threading.Event, tools: list[dict] | None = None):
    """Decode media and tokenize (blocking); over the context, 400 or (CONTEXT_OVERFLOW=truncate)
    drop the oldest non-system turns with their media. Returns (prompt, inputs, dropped)."""
    image_size, video_size = vision_sizes(processor, settings)  # the deadline runs from when a pool thread starts
    budget = DecodeBudget(settings.media_decode_timeout_seconds, cancel, image_pixels=image_size["longest_edge"],
                          video_pixels=video_size["longest_edge"])
    for message in messages:
        message.decode(settings, budget)
    prompt, inputs = tokenize(processor, messages, settings, tools)
    if prompt_length(inputs) < context:
        return prompt, inputs, 0
    droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
    if settings.context_overflow != "truncate" or not droppable:
        raise over_context(prompt_length(inputs), context)
    return truncate_turns(messages, droppable, settings, processor, context, tools)


def truncate_turns(messages: list[PromptMessage], droppable: list[int], settings: Settings, processor, context: int,
                   tools: list[dict] | None = None):
    """The prompt without the fewest oldest droppable turns that lets it fit: (prompt, inputs,
    dropped). Bisected, since tokens only fall as turns go: dropping one turn per try cost a
    tokenization of the whole prompt per dropped turn."""

    def without(count: int) -> tuple[str, Any]:
        gone = set(droppable[:count])
        return tokenize(processor, [m for i, m in enumerate(messages) if i not in gone], settings, tools)

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
    """How each choice of a request is sampled. Choice i draws from its own generator seeded
    with seed + i (D22), so choice i of a seeded n-choice request equals a one-choice
    request with seed + i; without a seed every choice gets a random one."""

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
    n: int = 1  # choices, each its own row
    logprobs: bool = False
    top_logprobs: int = 0  # most probable alternatives listed with each token's logprob
    max_reasoning_tokens: int | None = None  # `</think>` is forced after this many (D53); None: no cap

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
        logit_bias=checked_logit_bias(req.logit_bias, vocab_size),
        n=req.n, logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0, max_reasoning_tokens=reasoning_budget(req))


def reasoning_budget(req: ChatCompletionRequest) -> int | None:
    """max_reasoning_tokens, else the budget of reasoning_effort (D53), else no cap."""
    if req.max_reasoning_tokens is not None:
        return req.max_reasoning_tokens
    return REASONING_EFFORT_TOKENS[req.reasoning_effort] if req.reasoning_effort else None


def refuse_control_tokens(req: ChatCompletionRequest, control: tuple[str, ...]) -> None:
    """Text is text: a message may not spell a control token (`<|im_start|>`, `<|image_pad|>`...),
    which the tokenizer would turn into the real token (a forged turn, or a vision
    placeholder without its image). Refused, not escaped: no rewrite of what was asked (D38).
    Tool definitions, calls and reasoning in the history are written verbatim too (D58)."""
    for i, message in enumerate(req.messages):
        for text in message_texts(message):
            found = next((token for token in control if token in text), None)
            if found:
                raise invalid(f"Message text may not contain the control token {found}.", f"messages.{i}.content",
                              "invalid_value")
    tools = json.dumps(template_tools(req) or [], ensure_ascii=False)  # the template writes them as JSON
    found = next((token for token in control if token in tools), None)
    if found:
        raise invalid(f"Tool definitions may not contain the control token {found}.", "tools", "invalid_value")


def message_texts(message: Message) -> list[str]:
    """Every text of a message that the template writes into the prompt verbatim."""
    texts = [message.content] if isinstance(message.content, str) else [
        p.text for p in message.content or [] if isinstance(p, TextPart)]
    texts += [text for text in (message.reasoning_content, message.reasoning) if text]
    for call in message.tool_calls or []:
        arguments = call.function.arguments
        texts += [call.function.name, arguments if isinstance(arguments, str) else json.dumps(arguments)]
    return texts


def checked_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> dict[int, float]:
    if bias and max(bias) >= vocab_size:
        raise invalid(f"logit_bias names a token id outside the vocabulary ({vocab_size}).", "logit_bias",
                      "invalid_value")
    return bias or {}


# ----------------------------------------------------------------------------- constrained decoding

# llguidance, not xgrammar: clean refusals for a 400, added tokens (`<|im_start|>`,
# `</think>`) never allowed inside JSON text, one grammar language (Lark with %json) for
# answers and tool calls (D50).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Whitespace allowed between JSON tokens: flexible, so Qwen can pretty-print as it was
# trained to; bounded, so a degenerate sampler cannot spend max_tokens on blank lines
# (the known failure of "any whitespace" JSON grammars).
JSON_WHITESPACE = r"[ \t\r\n]{0,20}"
# Qwen writes "\n\n" between `</think>` and its answer; forcing the answer's first byte
# right after `</think>` would push the model off what it was trained on.
LEAD_WHITESPACE = r"/[ \t\r\n]{1,4}/"
# OpenAI: a function without `parameters` takes none, so its arguments are exactly {}
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
GRAMMAR_CACHE_SIZE = 256
PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)  # bit -> score offset: banned -inf, allowed +0


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar; each row gets its own copy of the prototype matcher."""

    source: str  # the Lark text, which is also the cache key
    prototype: llguidance.LLMatcher

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.prototype.deep_copy()  # ~13 µs; building a matcher from source costs ~2 ms


def canonical_json(value: Any) -> str:
    """Compact JSON that keeps key order: llguidance makes the model write properties in the
    order the schema lists them, so schemas that differ only in order are different grammars."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def lark_literal(text: str) -> str:
    """A Lark string literal (Lark takes JSON's escapes)."""
    return json.dumps(text)


def json_rule(schema: dict) -> str:
    """`%json` embeds a JSON Schema in Lark; x-guidance carries our whitespace bound."""
    return "%json " + canonical_json({**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}})


def call_rules(functions: list[FunctionDefinition], parallel: bool) -> list[str]:
    """Qwen's tool-call blocks exactly as its template renders them:
    `<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`, several separated by "\\n"."""
    opening, closing = lark_literal(TOOL_CALL_OPEN + '\n{"name": '), lark_literal("}\n" + TOOL_CALL_CLOSE)
    rules = ['calls: call ("\\n" call)*' if parallel else "calls: call", f"call: {opening} fn {closing}",
             "fn: " + " | ".join(f"fn_{i}" for i in range(len(functions)))]
    for i, fn in enumerate(functions):
        head = lark_literal(f'"{fn.name}", "arguments": ')
        rules.append(f"fn_{i}: {head} {json_rule(fn.parameters or EMPTY_PARAMETERS)}")
    return rules


def lark_grammar(answer: dict | None, functions: list[FunctionDefinition], parallel: bool) -> str:
    """All the output after `</think>`: a JSON answer matching `answer`, tool-call blocks of
    `functions`, or either of the two when both are given; 1-4 whitespace characters may come first."""
    bodies = (["answer"] if answer is not None else []) + (["calls"] if functions else [])
    rules = [f"start: LEAD? ({' | '.join(bodies)})", f"LEAD: {LEAD_WHITESPACE}"]
    if answer is not None:
        rules.append(f"answer: {json_rule(answer)}")
    if functions:
        rules += call_rules(functions, parallel)
    return "\n".join(rules) + "\n"


def answer_schema(req: ChatCompletionRequest) -> dict | None:
    """The schema response_format asks the answer to match; None for text. `strict: false`
    is enforced as well: a grammar can only make the answer match better (D51)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ or {"type": "object"}


def forced_functions(req: ChatCompletionRequest) -> list[FunctionDefinition]:
    """The functions the model must call from: the named one, or all of them with "required"."""
    functions = [tool.function for tool in req.tools or []]
    if req.tool_choice == "required":
        return functions
    if isinstance(req.tool_choice, NamedToolChoice):
        return [fn for fn in functions if fn.name == req.tool_choice.function.name]
    return []


def needs_grammar(req: ChatCompletionRequest) -> bool:
    return bool(forced_functions(req)) or answer_schema(req) is not None


class GrammarCompiler:
    """Request -> Grammar, with an LRU cache keyed by the grammar's Lark text (D50).

    Called while the request is prepared (preprocessing pool), never on the decode thread:
    a cold compile takes milliseconds, a cache hit microseconds, and the worker only copies
    the prototype matcher. One per loaded model: the llguidance tokenizer takes ~2 s to
    build at Qwen's vocabulary.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        # n_vocab = the logits' width (151,936 for Qwen3-VL), not len(tokenizer) (151,669):
        # masks then cover every logit, and ids past the tokenizer are always banned
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self._compile = lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._build)

    def for_request(self, req: ChatCompletionRequest) -> Grammar | None:
        """What the request decodes under: a forced call wins over response_format (D51); with
        tool_choice auto a JSON answer may instead be tool calls. GrammarError names the param."""
        forced = forced_functions(req)
        if forced:  # a named function is called once; "required" may call several
            return self.compile(lark_grammar(None, forced, req.parallel_tool_calls and req.tool_choice == "required"),
                                "tools")
        schema = answer_schema(req)
        if schema is None:
            return None
        answer = self.compile(lark_grammar(schema, [], False), "response_format")
        optional = [tool.function for tool in req.tools or []] if template_tools(req) else []
        return self.compile(lark_grammar(schema, optional, req.parallel_tool_calls), "tools") if optional else answer

    def compile(self, lark: str, param: str) -> Grammar:
        try:
            return self._compile(lark)  # lru_cache keeps successes only: a refusal is recomputed
        except ValueError as exc:
            raise GrammarError(f"Cannot constrain the output to this schema: {refusal_text(exc)}", param) from None

    def _build(self, lark: str) -> Grammar:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        matcher = None if error else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if error or matcher.is_error():
            raise ValueError(error or matcher.get_error())
        return Grammar(lark, matcher)


def refusal_text(exc: ValueError) -> str:
    """llguidance's reason, less the position in our Lark text and the excerpt of it that
    follows (our grammar, not the client's schema)."""
    first = str(exc).strip().split("\n", 1)[0]
    return re.sub(r"^at \d+\(\d+\): ", "", first)


def grammar_compiler(tokenizer, vocab_size: int, eos_ids: list[int]) -> GrammarCompiler | None:
    """The model's compiler, or None (logged) for a tokenizer llguidance cannot read: the
    server still serves text, and requests that need a grammar get a 400."""
    try:
        return GrammarCompiler(tokenizer, vocab_size, eos_ids)
    except Exception as exc:  # any failure here only disables constrained decoding
        logger.warning("constrained decoding unavailable: %s: %s", type(exc).__name__, exc)
        return None


def request_grammar(compiler: GrammarCompiler | None, req: ChatCompletionRequest) -> Grammar | None:
    """The request's grammar (blocking: run it off the event loop)."""
    if compiler is None and needs_grammar(req):
        raise GrammarError("Constrained decoding is not available for this model's tokenizer.",
                           "tools" if forced_functions(req) else "response_format")
    return compiler.for_request(req) if compiler is not None else None


async def prepare_grammar(compiler: GrammarCompiler | None, req: ChatCompletionRequest) -> Grammar | None:
    """The request's grammar, compiled in the preprocessing pool: never on the event loop or
    the decode thread (D50). None, at no cost, when nothing is constrained; a refusal is
    GrammarError (400)."""
    if not needs_grammar(req):
        return None
    return await asyncio.get_running_loop().run_in_executor(preprocess_pool(), partial(request_grammar, compiler, req))


def think_close_token(tokenizer) -> int | None:
    """The id of `</think>` when it is one token (Qwen's is), else None: then neither a
    grammar nor a budget can tell where reasoning ends, and grammars apply from the start."""
    return tokenizer.get_vocab().get(THINK_CLOSE)


def penalty(bitmask: np.ndarray, width: int) -> torch.Tensor:
    """bitmask [words] int32 (bit i of word w = token 32*w + i) -> scores to add, [width]
    float32: 0 where allowed, -inf where banned; bits past the mask are banned.

    Adding is what makes it cheap on CPU: at 151,936 logits a lookup plus add_ costs
    ~0.2 ms a row, masked_fill_ ~0.6 ms (it branches per element), and llguidance's own
    apply_token_bitmask_inplace needs torch.compile (D54).
    """
    bits = np.unpackbits(bitmask.view(np.uint8), count=width, bitorder="little")
    return torch.from_numpy(np.take(PENALTY, bits))


def force_token(scores: torch.Tensor, token_id: int) -> None:
    """Leave token_id the only finite score of a 1-D row (in place)."""
    scores.fill_(float("-inf"))
    scores[token_id] = 0.0


class ConstraintViolation(RuntimeError):
    """advance() got a token the grammar refuses: a bug upstream, since the mask allows only legal ones."""


class RowConstraint:
    """One row's grammar state. Inactive until the row closes its think block (the prompt
    opened `<think>`, so the row's own `</think>` token ends the reasoning); then mask()
    bans what the grammar forbids and advance() feeds it the sampled token (D51).

    EOS: banned while the row thinks (an answer that never starts cannot match); then
    allowed only where the grammar may end; once the answer is complete (`done`) it is the
    only token left, so the row ends through the usual EOS check (D54).
    think_close_id None: the prompt opened no think block, active from the first token.
    """

    def __init__(self, grammar: Grammar, think_close_id: int | None, eos_ids: list[int]):
        self.matcher = grammar.new_matcher()
        self.close_id, self.thinking = think_close_id, think_close_id is not None
        self.eos_ids = list(eos_ids)

    @property
    def active(self) -> bool:
        return not self.thinking

    def mask(self, scores: torch.Tensor) -> None:
        """scores: this row's [vocab] logits, masked in place."""
        if self.thinking:
            scores[self.eos_ids] = float("-inf")
            return
        bitmask = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)
        scores.add_(penalty(bitmask, scores.shape[-1]).to(scores.device, scores.dtype))

    def advance(self, token: int) -> None:
        """Raises ConstraintViolation at once, so the worker fails this row alone."""
        if self.thinking:
            self.thinking = token != self.close_id
        elif not self.matcher.consume_token(token):
            raise ConstraintViolation(self.matcher.get_error())


class ReasoningBudget:
    """Ends the think block after `limit` reasoning tokens: the next token is forced to
    `</think>` (D53). Every token up to and including `</think>` counts, the forced one too,
    so a capped row thinks limit + 1 tokens, and limit 0 skips thinking (the first token is
    `</think>`, which renders like Qwen's empty think block). A row that closes the block
    by itself earlier is left alone."""

    def __init__(self, limit: int, think_close_id: int):
        self.limit, self.close_id = limit, think_close_id
        self.spent, self.open = 0, True

    def mask(self, scores: torch.Tensor) -> None:
        if self.open and self.spent >= self.limit:
            force_token(scores, self.close_id)

    def advance(self, token: int) -> None:
        if self.open:
            self.spent += 1
            self.open = token != self.close_id


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
        self.control_tokens: tuple[str, ...] = ()
        self.grammars: GrammarCompiler | None = None
        self.think_close_id: int | None = None
        self.after_load: list[Callable[[Any], None]] = []  # run with the model before it is ready (warm-up)
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._task: asyncio.Future | None = None
        self._failed_at = 0.0

    async def ensure_loaded(self) -> None:
        """Ready, or wait for the first load; once a load has failed, answer at once (a retry
        runs in the background every RETRY_AFTER_FAILURE_SECONDS) instead of making every
        request wait out another slow failure (D40)."""
        if self.state == "ready":
            return
        if self.state in ("error", "loading") and self._failed_at:
            if self.state == "error" and time.monotonic() - self._failed_at >= self.RETRY_AFTER_FAILURE_SECONDS:
                self._task = asyncio.ensure_future(asyncio.to_thread(self.load))
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
                self.control_tokens = control_tokens(self.processor.tokenizer)
                self.think_close_id = think_close_token(self.processor.tokenizer)
                # built here, once: ~2 s at Qwen's vocabulary, too slow for a first request
                self.grammars = grammar_compiler(self.processor.tokenizer, self.vocab_size, self.eos_ids)
                for prepare in self.after_load:
                    prepare(self.model)
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


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The special added tokens' strings (`<|im_start|>`...), which text must not spell."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return tuple(sorted({t.content for t in added.values() if t.special} | set(tokenizer.all_special_tokens)))


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

    OPEN, CLOSE = THINK_OPEN, THINK_CLOSE

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


# A call's header, matched from the start of a block; it ends on the colon, so a match never
# depends on text that has not arrived (all optional whitespace sits before a fixed character).
TOOL_CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


@dataclass(frozen=True)
class ToolCallStart:
    index: int  # the call's place among this generation's calls, from 0
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    text: str  # the next piece of the arguments' JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolCallEnd:
    index: int


ToolCallEvent = ToolCallStart | ToolCallArguments | ToolCallEnd
Piece = tuple[str, Any]  # ("reasoning_content" | "content", text) or ("tool_call", ToolCallEvent)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class JSONValueEnd:
    """Finds where one JSON value ends in a stream of text, without parsing it.

    Leading whitespace is skipped; an object or array ends when its brackets balance, a
    string at its closing quote, a bare number/true/false/null just before the first
    delimiter. Brackets and quotes inside strings do not count.
    """

    def __init__(self):
        self.depth, self.started, self.bare, self.in_string, self.escaped = 0, False, False, False, False

    def feed(self, text: str) -> tuple[str, str | None]:
        """(the value's text in this piece, the text after the value, or None while it goes on)."""
        start = 0
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    start = i + 1
                    continue
                self.started = True
            end = self._step(ch)
            if end is not None:
                return text[start:i + end], text[i + end:]
        return text[start:], None

    def _step(self, ch: str) -> int | None:
        """Take one character: None while the value goes on, 1 if it ends with ch, 0 if it ended before ch."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return 1 if self.depth == 0 else None
            return None
        if self.bare and self.depth == 0 and (ch in ",}]" or ch.isspace()):
            return 0
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return 1 if self.depth == 0 else None
        elif self.depth == 0:
            self.bare = True
        return None


class ToolCallParser:
    """Content text in, ("content", text) and ("tool_call", event) pieces out (D55).

    Qwen writes each call as `<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>`.
    Rules, each holding for every way of cutting the text into pieces:
    1. A call starts once `{"name": "...", "arguments":` is complete; the arguments are then
       streamed up to their last byte (a string- and escape-aware scan finds it), and what
       follows up to `</tool_call>` (the closing brace) is dropped.
    2. `</tool_call>` always closes the open block, even inside unfinished arguments (as
       vLLM's Hermes parser does): the call ends with the arguments it has.
    3. A block whose header never matches (keys in another order) is parsed whole at
       `</tool_call>`: a JSON object with a string name is one call; anything else goes to
       content verbatim, tags included, so nothing the model said is lost.
    4. At the end of generation an unclosed block is treated as if `</tool_call>` came.
    5. Whitespace that only separates text from a block is dropped (the template puts it
       there), so a reply that is only calls has no content; trailing whitespace of
       content waits for the next character.
    """

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self.new_id = new_id
        self.state = "text"  # text -> header -> arguments -> tail -> text
        self.held = ""  # text kept back: a possible partial tag, trailing whitespace, an unmatched header
        self.calls = 0
        self.after_block = False  # rule 5: whitespace right after a block is dropped
        self.gap = ""  # rule 5: whitespace dropped before the open block, given back if it is not a call
        self.value = JSONValueEnd()
        self.handlers = {"text": self._text, "header": self._header, "arguments": self._arguments,
                         "tail": self._tail}

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        buffer, self.held = self.held + text, ""
        while buffer:
            buffer = self.handlers[self.state](buffer, out)
        return out

    def flush(self) -> list[Piece]:
        """End of generation: rule 4 for an open block; held text becomes content."""
        out: list[Piece] = []
        held, self.held = self.held, ""
        if self.state == "text":
            self._content(out, held.lstrip() if self.after_block else held)
        elif self.state == "header":
            self._whole_block(held, out, closed=False)
        else:
            if self.state == "arguments" and held:
                self._arguments_text(held, out)
            self._end(out)
        self.state = "text"
        return out

    # Each state handler consumes the front of the buffer and returns the rest.

    def _text(self, buffer: str, out: list) -> str:
        if self.after_block:
            buffer = buffer.lstrip()
        i = buffer.find(TOOL_CALL_OPEN)
        if i >= 0:
            text = buffer[:i].rstrip()
            self._content(out, text)
            self.gap, self.state = buffer[len(text):i], "header"
            return buffer[i + len(TOOL_CALL_OPEN):]
        keep = partial_suffix(buffer, TOOL_CALL_OPEN)
        text = buffer[:len(buffer) - keep]
        self._content(out, text.rstrip())
        self.held = text[len(text.rstrip()):] + buffer[len(buffer) - keep:]
        return ""

    def _header(self, buffer: str, out: list) -> str:
        close = buffer.find(TOOL_CALL_CLOSE)
        match = TOOL_CALL_HEADER.match(buffer, 0, close if close >= 0 else len(buffer))
        if match:
            self._start(json_string(match.group(1)), out)
            return buffer[match.end():]
        if close >= 0:  # rule 3
            self._whole_block(buffer[:close], out, closed=True)
            return buffer[close + len(TOOL_CALL_CLOSE):]
        self.held = buffer
        return ""

    def _arguments(self, buffer: str, out: list) -> str:
        close = buffer.find(TOOL_CALL_CLOSE)
        if close < 0:
            keep = partial_suffix(buffer, TOOL_CALL_CLOSE)
            self.held = buffer[len(buffer) - keep:]
            self._arguments_text(buffer[:len(buffer) - keep], out)
            return ""
        self._arguments_text(buffer[:close], out)
        self.state = "tail"  # rule 2 when the value had not ended
        return buffer[close:]

    def _tail(self, buffer: str, out: list) -> str:
        close = buffer.find(TOOL_CALL_CLOSE)
        if close < 0:
            self.held = buffer[len(buffer) - partial_suffix(buffer, TOOL_CALL_CLOSE):]
            return ""
        self._end(out)
        return buffer[close + len(TOOL_CALL_CLOSE):]

    def _arguments_text(self, text: str, out: list) -> None:
        value, rest = self.value.feed(text)
        if value:
            out.append(("tool_call", ToolCallArguments(self.calls - 1, value)))
        if rest is not None:
            self.state = "tail"

    def _start(self, name: str, out: list) -> None:
        out.append(("tool_call", ToolCallStart(self.calls, self.new_id(), name)))
        self.calls += 1
        self.value, self.state = JSONValueEnd(), "arguments"

    def _end(self, out: list) -> None:
        out.append(("tool_call", ToolCallEnd(self.calls - 1)))
        self.state, self.after_block = "text", True

    def _whole_block(self, body: str, out: list, closed: bool) -> None:
        """Rule 3: a block parsed whole, or given back to content as it was written."""
        try:
            call = json.loads(body)
        except ValueError:
            call = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            self._content(out, self.gap + TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if closed else ""))
            self.state = "text"
            return
        arguments = call.get("arguments", {})
        self._start(call["name"], out)
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        out.append(("tool_call", ToolCallArguments(self.calls - 1, text)))
        self._end(out)

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(("content", text))
            self.after_block = False


def json_string(body: str) -> str:
    """The value of a JSON string literal's body; a malformed escape is kept as written."""
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return body


class TextPipeline:
    """Decoded text in, pieces out: stop strings first, then the reasoning split, then (when
    the request has tools) tool calls parsed out of the content; reasoning is never parsed."""

    def __init__(self, stops: list[str], reasoning: bool, tools: bool = False):
        self.stop, self.split = StopMatcher(stops), ReasoningSplitter(reasoning)
        self.calls = ToolCallParser() if tools else None

    def feed(self, text: str) -> list[Piece]:
        return self._parse(self.split.feed(self.stop.feed(text)))

    def flush(self) -> list[Piece]:
        tail = [] if self.stop.stopped else self.split.feed(self.stop.flush())
        return self._parse(tail + self.split.flush()) + (self.calls.flush() if self.calls else [])

    @property
    def called(self) -> bool:
        """A tool call started: the row ends with finish_reason tool_calls."""
        return self.calls is not None and self.calls.calls > 0

    def _parse(self, pieces: list[tuple[str, str]]) -> list[Piece]:
        if self.calls is None:
            return pieces
        return [out for name, text in pieces
                for out in (self.calls.feed(text) if name == "content" else [(name, text)])]



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

@dataclass
class TokenLogprob:
    """One generated token as logprobs list it: its text, log probability and UTF-8 bytes,
    and (`top`) the most probable tokens at that step, most probable first."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Delta:
    """New text of one choice for one message field, with the logprobs of the tokens in it.

    kind is "reasoning_content", "content" or "tool_call" (then `call` holds the event).
    logprobs is None unless the request asked for them; then a list, possibly empty: each
    token rides with the first delta emitted at or after it, so the deltas' lists add up
    to the choice's whole list.
    """

    kind: str
    text: str
    index: int = 0  # the choice, 0 .. n-1
    logprobs: list[TokenLogprob] | None = None
    call: ToolCallEvent | None = None  # kind "tool_call" (text ""): a call's start, argument text or end


def piece_delta(kind: str, value: Any, index: int = 0, logprobs: list[TokenLogprob] | None = None) -> Delta:
    """A text-pipeline piece as a Delta: text for a message field, the event for a tool call."""
    if kind == "tool_call":
        return Delta(kind, "", index, logprobs, value)
    return Delta(kind, value, index, logprobs)


class GenerationSink(Protocol):
    """Where a generation's output goes: the one interface between engine and event shapers (D4).

    Called on the event loop (the Outbox delivers), in order: deltas any number of times,
    then finish once per choice (each when that choice ends), or one fail that ends the
    choices still running. A shaper is told n when it is made and closes its stream after
    the n-th finish or the fail; with n = 1 that is exactly one finish or fail.
    """

    def deltas(self, deltas: list[Delta]) -> None:
        """New text and tool-call events; per choice, consecutive deltas to one field (and one
        call's argument text) are already merged."""

    def finish(self, reason: str, completion_tokens: int, index: int = 0) -> None:
        """Choice `index` ended: stop, tool_calls, length, cancelled or timeout, after
        completion_tokens tokens."""

    def fail(self, message: str, completion_tokens: int) -> None:
        """The generation broke; message is safe to show; tokens of the choices still running."""


@dataclass
class TokenCounts:
    """What a generation has produced so far, for usage reports (the worker writes it)."""

    generated: int = 0
    reasoning: int = 0  # of those, tokens before the think block closed (`</think>` included)


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
    grammar: Grammar | None = None  # what the answer must match (D51); None costs nothing
    tools: bool = False  # parse tool calls out of the content
    started: float = field(default_factory=time.monotonic)
    claimed: bool = False
    deadline: float = float("inf")
    last_token_at: float = 0.0
    counts: TokenCounts = field(default_factory=TokenCounts)
    text_posted: bool = False  # the worker has posted this job's first text
    running: int = 0  # choices started and not yet ended (worker thread)
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


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: byte-level BPE (Qwen's tokenizer) spells each
    byte of a token as one printable character; this maps the characters back to bytes."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(map(chr, printable + [0x100 + i for i in range(len(others))]), printable + others))


class TokenTexts:
    """A token id as logprobs show it: (text, UTF-8 bytes), cached per id (worker thread).

    The bytes are the token's own, also for a token holding part of a multi-byte character
    (clients join such bytes); its text is then written `bytes:\\xe4\\xbd`, as OpenAI does.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = byte_level_decoder()
        self.literal = set(tokenizer.added_tokens_decoder)  # special and added tokens are spelled as-is
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.cache:
            self.cache[token] = self._describe(token)
        return self.cache[token]

    def _describe(self, token: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:  # the logits are wider than the vocabulary
            return "", []
        if token in self.literal or any(c not in self.byte_of for c in piece):
            raw = (piece if token in self.literal else self.tokenizer.decode([token])).encode()
        else:
            raw = bytes(self.byte_of[c] for c in piece)
        try:
            return raw.decode(), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


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

    def final(self, reason: str) -> str:
        """The reason reported once the pipeline is flushed: a generation that ended by itself
        after calling a tool ends with tool_calls, as OpenAI's do (D55)."""
        return "tool_calls" if reason == "stop" and self.pipeline.called else reason


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
    index: int = 0  # which choice of its job this row decodes
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is not out yet
    constraint: RowConstraint | None = None  # the job's grammar, this row's state of it
    budget: ReasoningBudget | None = None


INITIAL_CACHE_COLUMNS = 1024  # per slot at model load; doubles when a row needs more (D70)
# MAX_PREFILL_TOKENS_PER_STEP=0 (auto) by device: what keeps running streams' p99 token gap
# within 2x while a 2,000-token prompt joins (P7, D72); CUDA's is a guess, not measured
PREFILL_TOKENS_PER_STEP = {"cpu": 64, "cuda": 512}


class SlotCache:
    """The running batch's KV cache, preallocated per slot (D70).

    Per layer, keys and values are [slots, kv_heads, capacity, head_dim] tensors. Row i of
    the batch lives in slot i with its tokens at columns 0..position-1, so there is no
    padding: a joining row copies only its own prefill into a free slot, and a leaving row
    is replaced by the batch's last row (one row's columns copied). A decode step writes
    each row's new key and value at the row's own column. When a row needs more columns
    the capacity doubles: the one copy of every row, rare, logged.

    During a step, decode_layer calls update(): it stores the step's keys and values and
    returns the first rows' slots up to the step's attended width.
    """

    def __init__(self, text_config, slots: int, capacity: int, dtype: torch.dtype, device):
        heads = text_config.num_key_value_heads
        dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        shape = (slots, heads, capacity, dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_config.num_hidden_layers)]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, columns: int) -> None:
        """Room for `columns` columns per slot, doubling the capacity (logged)."""
        capacity = self.capacity
        if columns <= capacity:
            return
        while capacity < columns:
            capacity *= 2
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :old.shape[2]] = old
                store[i] = new
        logger.info("KV cache grew to %d columns per slot", capacity)

    def load(self, slot: int, prompt, length: int) -> None:
        """Copy a prefilled prompt (a one-row DynamicCache of `length` tokens) into `slot`."""
        for layer, source in enumerate(prompt.layers):
            self.keys[layer][slot, :, :length] = source.keys[0, :, :length]
            self.values[layer][slot, :, :length] = source.values[0, :, :length]

    def move(self, source: int, target: int, length: int) -> None:
        for tensor in self.keys + self.values:
            tensor[target, :, :length] = tensor[source, :, :length]

    def update(self, key_states, value_states, layer: int, columns: torch.Tensor, width: int):
        """Store one token per row, row i's at its column `columns[i]`; return the first rows'
        keys and values up to `width` columns."""
        rows = key_states.shape[0]
        keys, values = self.keys[layer], self.values[layer]
        index = torch.arange(rows, device=keys.device)
        keys[index, :, columns] = key_states[:, :, 0]
        values[index, :, columns] = value_states[:, :, 0]
        return keys[:rows, :, :width], values[:rows, :, :width]


def fuse_projections(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, one weight for q, k and v and one for gate and up (D73): the
    layers' own parameters become views into them, so nothing is duplicated and prefill,
    which still runs the layers' modules, reads the same memory."""
    fused = []
    for layer in model.model.language_model.layers:
        parts = []
        for names, owner in ((("q_proj", "k_proj", "v_proj"), layer.self_attn), (("gate_proj", "up_proj"), layer.mlp)):
            linears = [getattr(owner, name) for name in names]
            if any(linear.bias is not None for linear in linears):
                raise ValueError("projections with a bias are not fused")
            weight = torch.cat([linear.weight.detach() for linear in linears])
            start = 0
            for linear in linears:
                rows = linear.weight.shape[0]
                linear.weight = torch.nn.Parameter(weight[start:start + rows], requires_grad=False)
                start += rows
            parts.append(weight)
        fused.append((parts[0], parts[1]))
    return fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def decode_layer(layer, fused: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, mask: torch.Tensor, cache: SlotCache, index: int,
                 columns: torch.Tensor) -> torch.Tensor:
    """One decoder layer for one token per row, as Qwen3-VL's layer computes it, with q/k/v
    and gate/up each one product (fused) and grouped-query attention without copying the
    keys: a row's n_rep query heads of one key/value head attend as n_rep queries."""
    attn, mlp = layer.self_attn, layer.mlp
    rows, dim = hidden.shape[0], attn.head_dim
    q_size, kv_size = attn.q_proj.out_features, attn.k_proj.out_features
    residual = hidden
    q, k, v = torch.nn.functional.linear(layer.input_layernorm(hidden), fused[0]).split(
        [q_size, kv_size, kv_size], dim=-1)
    q = attn.q_norm(q.view(rows, 1, -1, dim)).transpose(1, 2)  # [rows, heads, 1, dim]
    k = attn.k_norm(k.view(rows, 1, -1, dim)).transpose(1, 2)
    v = v.view(rows, 1, -1, dim).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    keys, values = cache.update(k, v, index, columns, width=mask.shape[-1])
    groups = keys.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, groups, -1, dim), keys, values, attn_mask=mask, scale=attn.scaling)
    hidden = residual + attn.o_proj(out.reshape(rows, 1, q_size))
    gate, up = torch.nn.functional.linear(layer.post_attention_layernorm(hidden), fused[1]).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def decode_logits(model, fused: list, cache: SlotCache, ids: torch.Tensor, text: torch.Tensor, spatial: torch.Tensor,
                  width: int):
    """One decode step for the first len(ids) slots, attending to `width` columns: (rows,
    vocab) logits.

    ids, text, spatial: [rows] long tensors (the fed token, its text position, which is
    also the column its key and value go to, and its t/h/w position = text position + the
    row's M-RoPE delta). Decode steps carry no vision
    input, so this runs the text model's layers (decode_layer) and lm_head directly, with
    a mask that lets each row see its own columns 0..text: no padding, no per-call checks
    of the wrappers (D31).
    """
    lm = model.model.language_model
    hidden = lm.embed_tokens(ids[:, None])
    cos, sin = lm.rotary_emb(hidden, spatial.view(1, -1, 1).expand(3, -1, 1))  # [rows, 1, head_dim]
    mask = (torch.arange(width, device=ids.device)[None, :] <= text[:, None])[:, None, None, :]
    for index, layer in enumerate(lm.layers):
        hidden = decode_layer(layer, fused[index], hidden, cos=cos[:, None], sin=sin[:, None], mask=mask, cache=cache,
                              index=index, columns=text)
    return model.lm_head(lm.norm(hidden)[:, -1])


def bucket_sizes(slots: int) -> list[int]:
    """Batch sizes a compiled step is built for: powers of two up to `slots` (which is one)."""
    sizes = [1]
    while sizes[-1] < slots:
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeStep:
    """decode_logits for the batch: eager, or compiled (COMPILE, D71).

    Eager attends to exactly the columns in use. Compiled runs torch.compile'd
    decode_logits at fixed shapes: the row count padded up to a power of two (the padding
    rows feed token 0 at column 0 of free slots) and every column of the capacity; on CUDA
    each batch size is captured once as a CUDA graph and replayed, so a step is one copy
    of a [3, rows] tensor and one graph launch. warm_up() builds every size at model load;
    a capacity change rebuilds them. If compiling or capturing fails, the step falls back
    to eager for good and says why once.
    """

    def __init__(self, model, fused: list, cache: SlotCache, compiled: bool):
        self.model, self.fused, self.cache = model, fused, cache
        self.device = cache.keys[0].device
        self.compiled = compiled
        self.graphs_on = compiled and self.device.type == "cuda"
        self.function = torch.compile(partial(decode_logits, model, fused), dynamic=True) if compiled else None
        self.graphs: dict[int, tuple] = {}  # batch size -> (graph, its static [3, size] input, its logits)
        self.capacity = cache.capacity
        self.pool = None

    def __call__(self, ids: list[int], text: list[int], spatial: list[int]) -> torch.Tensor:
        if self.compiled:
            try:
                return self._compiled(ids, text, spatial)
            except Exception as exc:  # e.g. a backend without a compiler: eager still works
                self._give_up(exc)
        as_tensor = partial(torch.tensor, dtype=torch.long, device=self.device)
        return decode_logits(self.model, self.fused, self.cache, ids=as_tensor(ids), text=as_tensor(text),
                             spatial=as_tensor(spatial), width=max(text) + 1)

    def warm_up(self) -> None:
        """Compile (and capture) every batch size now, so that no request pays for it."""
        if not self.compiled:
            return
        started = time.monotonic()
        for size in bucket_sizes(self.cache.slots):
            self([0] * size, [0] * size, [0] * size)
            if not self.compiled:
                return
        logger.info("decode step compiled for batch sizes %s in %.1f s (CUDA graphs: %s)",
                    bucket_sizes(self.cache.slots), time.monotonic() - started, "on" if self.graphs_on else "off")

    def _compiled(self, ids: list[int], text: list[int], spatial: list[int]) -> torch.Tensor:
        if self.cache.capacity != self.capacity:  # the tensors were replaced: new shapes and addresses
            if self.graphs:  # compiled for dynamic shapes: only the graphs are captured again
                logger.info("KV cache grew to %d columns: capturing the decode step's CUDA graphs again",
                            self.cache.capacity)
            self.graphs, self.capacity = {}, self.cache.capacity
        rows = len(ids)
        size = next(s for s in bucket_sizes(self.cache.slots) if s >= rows)
        padding = [0] * (size - rows)
        inputs = torch.tensor([ids + padding, text + padding, spatial + padding], dtype=torch.long)
        if not self.graphs_on:
            inputs = inputs.to(self.device)
            return self.function(self.cache, inputs[0], inputs[1], inputs[2], self.cache.capacity)[:rows]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, static, logits = self.graphs[size]
        static.copy_(inputs, non_blocking=True)
        graph.replay()
        return logits[:rows]

    def _capture(self, size: int) -> tuple:
        # the warm-up runs and the capture really execute: they write column capacity-1 of
        # slots 0..size-1, which no live row has written yet (Batch.forward reserves one
        # column past every row's position), never a live row's keys (a regrowth captures
        # while rows are running)
        static = torch.zeros(3, size, dtype=torch.long, device=self.device)
        static[1:].fill_(self.cache.capacity - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles, then runs once more outside the capture
                self.function(self.cache, static[0], static[1], static[2], self.cache.capacity)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.function(self.cache, static[0], static[1], static[2], self.cache.capacity)
        return graph, static, logits

    def _give_up(self, exc: Exception) -> None:
        logger.warning("compiled decode step failed (%s: %s); decoding eagerly from now on",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.compiled = self.graphs_on = False
        self.graphs = {}


class Batch:
    """Rows decoding together, row i in slot i of one SlotCache.

    Position ids are given per row (four rows for M-RoPE: text position, then t/h/w = text
    position + the row's rope delta), and each row attends to its own columns only, so a
    row decodes exactly as it would alone.
    """

    def __init__(self):
        self.rows: list[Row] = []
        self.cache: SlotCache | None = None
        self.step: DecodeStep | None = None

    def prepare(self, model, slots: int, compiled: bool) -> None:
        """Allocate the cache (and build the decode step) for `slots` rows; at model load."""
        text = model.config.text_config
        slots = bucket_sizes(slots)[-1] if compiled else slots
        capacity = min(INITIAL_CACHE_COLUMNS, text.max_position_embeddings + 1)
        self.cache = SlotCache(text, slots, capacity, model.dtype, model.device)
        self.step = DecodeStep(model, fuse_projections(model), self.cache, compiled)
        self.step.warm_up()

    def join(self, rows: list[Row], prompt, length: int) -> None:
        """Add one prefilled prompt as the rows of its choices: each slot gets its own copy."""
        self.cache.reserve(length + 1)
        for row in rows:
            self.cache.load(len(self.rows), prompt, length)
            self.rows.append(row)

    def forward(self) -> torch.Tensor:
        """One decode step for every row: (rows, vocab) logits."""
        self.cache.reserve(max(row.position for row in self.rows) + 1)
        logits = self.step([row.last for row in self.rows], [row.position for row in self.rows],
                           [row.position + row.rope_delta for row in self.rows])
        for row in self.rows:
            row.position += 1
        return logits

    def drop(self, done: set[Row]) -> None:
        """Remove finished rows: each freed slot takes the batch's last row (one row's copy)."""
        if len(done) >= len(self.rows) and all(row in done for row in self.rows):
            self.rows = []
            return
        for row in [row for row in self.rows if row in done]:
            slot, last = self.rows.index(row), len(self.rows) - 1
            if slot != last:
                self.cache.move(last, slot, self.rows[last].position)
                self.rows[slot] = self.rows[last]
            self.rows.pop()


def prompt_embeddings(model, ids: torch.Tensor, vision: dict) -> tuple[torch.Tensor, torch.Tensor | None, list | None]:
    """The prompt's input embeddings with its images' and videos' features in place, the
    mask of those visual tokens, and the deepstack features the first layers add to them
    (one [visual tokens, hidden] tensor per layer, in prompt order), as Qwen3-VL's own
    forward builds them: the vision encoder runs here, once per prompt."""
    outer = model.model
    embeds = outer.get_input_embeddings()(ids)
    found = []  # (mask, deepstack features) per modality
    for pixels, grid, token, encode in (
            ("pixel_values", "image_grid_thw", model.config.image_token_id, outer.get_image_features),
            ("pixel_values_videos", "video_grid_thw", model.config.video_token_id, outer.get_video_features)):
        if pixels not in vision:
            continue
        out = encode(vision[pixels], vision[grid], return_dict=True)
        features = torch.cat(out.pooler_output).to(embeds.device, embeds.dtype)
        mask = ids == token
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} placeholder tokens for {features.shape[0]} visual features")
        embeds = embeds.masked_scatter(mask[..., None], features)
        found.append((mask, [torch.cat(layer) for layer in out.deepstack_features]))
    if not found:
        return embeds, None, None
    if len(found) == 1:
        return embeds, found[0][0], found[0][1]
    (image, image_stack), (video, video_stack) = found
    visual = image | video
    joint = []
    for image_layer, video_layer in zip(image_stack, video_stack):
        layer = image_layer.new_zeros(int(visual.sum()), image_layer.shape[-1])
        layer[image[visual]] = image_layer
        layer[video[visual]] = video_layer
        joint.append(layer)
    return embeds, visual, joint


class Prefill:
    """One prompt's prefill, in one piece or in chunks between decode steps (D72).

    The vision encoder runs once, when it starts (prompt_embeddings); each run() then feeds
    the text model the next slice of the prompt's embeddings with its slice of the M-RoPE
    positions and of the deepstack features (the visual tokens inside that slice), over
    the prompt's own DynamicCache. After the last slice, `logits` holds the last token's.
    """

    def __init__(self, model, inputs):
        inputs = inputs.to(model.device)
        ids = inputs["input_ids"]
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        self.model, self.length, self.done = model, ids.shape[1], 0
        text = torch.arange(self.length, device=ids.device).view(1, 1, self.length)
        if "image_grid_thw" in vision or "video_grid_thw" in vision:
            spatial, delta = model.model.get_rope_index(
                ids, image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=vision.get("video_grid_thw"),
                attention_mask=inputs["attention_mask"], mm_token_type_ids=vision.get("mm_token_type_ids"))
            self.rope_delta = int(delta.reshape(-1)[0])
        else:
            spatial, self.rope_delta = text.expand(3, 1, self.length), 0
        self.positions = torch.cat([text, spatial])  # [4, 1, length]
        self.embeds, self.visual, self.deepstack = prompt_embeddings(model, ids, vision)
        self.cache = DynamicCache(config=model.config.text_config)
        self.logits: torch.Tensor | None = None  # [1, vocab], once done

    @property
    def finished(self) -> bool:
        return self.done == self.length

    def run(self, tokens: int) -> int:
        """Prefill the next `tokens` prompt tokens (at least one); how many ran."""
        start, end = self.done, min(self.length, self.done + max(tokens, 1))
        extra = {}
        if self.visual is not None and bool(self.visual[:, start:end].any()):
            before, inside = int(self.visual[:, :start].sum()), int(self.visual[:, start:end].sum())
            extra = {"visual_pos_masks": self.visual[:, start:end],
                     "deepstack_visual_embeds": [layer[before:before + inside] for layer in self.deepstack]}
        mask = torch.ones(1, end, dtype=torch.long, device=self.embeds.device)
        hidden = self.model.model.language_model(
            inputs_embeds=self.embeds[:, start:end], attention_mask=mask, position_ids=self.positions[:, :, start:end],
            cache=self.cache, use_cache=True, **extra).last_hidden_state
        self.done = end
        if self.finished:
            self.logits = self.model.lm_head(hidden[:, -1, :])
        return end - start


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
        keep = (probs.cumsum(-1) - probs) < p.top_p
        keep[:, 0] = True  # the most probable token always stays (top_p 0 keeps only it)
        probs = probs * keep
    cdf = probs.cumsum(-1)
    draws = torch.tensor([torch.rand((), generator=g).item() for g in generators], dtype=cdf.dtype)
    picks = torch.searchsorted(cdf, (draws.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).clamp(max=k - 1)
    return (indices.gather(-1, picks) if indices is not None else picks).reshape(-1).tolist()


LOGPROB_FLOOR = -9999.0  # stands for -inf (a masked token), which JSON cannot carry


def token_logprobs(scores: torch.Tensor, tokens: list[int], tops: list[int], texts: TokenTexts) -> list[TokenLogprob]:
    """Logprobs of the picked tokens, and each row's `tops[i]` most probable alternatives.

    scores: [rows, vocab], each row as its sampler got it: after logit_bias, penalties
    and the min_tokens EOS mask, before temperature, top-k and top-p. So a greedy row's
    picked token is its most probable one, and a seed's draws do not change the numbers.
    Cost at Qwen's 151,936-token vocabulary on one CPU thread: log_softmax ~0.3 ms and
    topk(20) ~0.9 ms a row per step; only rows that asked pay it.
    """
    logprobs = torch.log_softmax(scores.float(), dim=-1)  # [rows, vocab]
    picked = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(max(tops), dim=-1)  # [rows, max(tops)], most probable first
    values, ids = values.tolist(), ids.tolist()
    return [logprob_entry(texts, token, logprob,
                          [logprob_entry(texts, i, v) for i, v in zip(ids[r][:tops[r]], values[r][:tops[r]])])
            for r, (token, logprob) in enumerate(zip(tokens, picked))]


def logprob_entry(texts: TokenTexts, token: int, logprob: float, top: list[TokenLogprob] | None = None) -> TokenLogprob:
    text, raw = texts(token)
    return TokenLogprob(text, max(logprob, LOGPROB_FLOOR), raw, top or [])


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """Per choice (in order of first appearance), consecutive deltas to the same field become
    one, and so does consecutive argument text of one tool call: texts joined, logprobs
    joined in the same order. A call's start and end stay deltas of their own."""
    runs: dict[int, list[Delta]] = {}
    for delta in deltas:
        choice = runs.setdefault(delta.index, [])
        if not choice or not mergeable(choice[-1], delta):
            choice.append(Delta(delta.kind, delta.text, delta.index,
                                None if delta.logprobs is None else list(delta.logprobs), delta.call))
            continue
        last = choice[-1]
        last.text += delta.text
        if isinstance(delta.call, ToolCallArguments):
            last.call = ToolCallArguments(last.call.index, last.call.text + delta.call.text)
        if last.logprobs is not None:
            last.logprobs.extend(delta.logprobs or [])
    return [delta for choice in runs.values() for delta in choice]


def mergeable(last: Delta, delta: Delta) -> bool:
    if last.kind != delta.kind:
        return False
    if delta.kind != "tool_call":
        return True
    return (isinstance(last.call, ToolCallArguments) and isinstance(delta.call, ToolCallArguments)
            and last.call.index == delta.call.index)


class Outbox:
    """What the worker tells the event loop, delivered in order, at most once per interval.

    A delivery goes out at once when it carries a job's first text or its end, or when
    the last one is at least STREAM_INTERVAL_MS old; otherwise when the interval is up.
    Steps decoded meanwhile join it, and a job's consecutive deltas become one event per
    choice and field (merge_deltas: tokens' logprobs stay with their text). Under load the
    loop gets fewer, larger events instead of one wake-up and one SSE send per token per
    stream; time to first token is never traded for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[int], None], interval: float):
        self.loop, self.release, self.interval = loop, release, interval
        self.items: list[tuple[Job, str, tuple, int]] = []
        self.scheduled = self.urgent = False
        self.last_delivery = 0.0
        self.lock = threading.Lock()

    def post(self, job: Job, kind: Literal["deltas", "finish", "fail"], *args, slots: int = 0) -> None:
        """Queue one sink call; its `slots` admission slots are freed once it is delivered (D15)."""
        with self.lock:
            self.items.append((job, kind, args, slots))
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
        pending: dict[Job, list[Delta]] = {}
        for job, kind, args, slots in items:
            if kind == "deltas":
                pending.setdefault(job, []).extend(args[0])
                continue
            if job in pending:
                job.sink.deltas(merge_deltas(pending.pop(job)))
            if kind == "finish":
                job.sink.finish(*args)
            else:
                job.sink.fail(*args)
            self.release(slots)  # the rows of the choices that ended are free again
        for job, deltas in pending.items():
            job.sink.deltas(merge_deltas(deltas))



class Worker:
    """The generation engine: one thread running a continuous-batching decode loop.

    Between decode steps it admits waiting jobs: each is prefilled alone (its images and
    video only there), in chunks of at most MAX_PREFILL_TOKENS_PER_STEP tokens between
    steps, and its n choices join the running batch as n rows, each in its own slot of the
    preallocated KV cache with its first token sampled from the one prefill. Every step
    decodes one token for every row; rows that finish, are cancelled or fail leave at
    once. The rest of the server only calls admit(), submit(), cancel_waiting() and
    release(); session and SSE code never see rows.
    """

    def __init__(self, models: ModelManager, settings: Settings, metrics: Metrics, loop: asyncio.AbstractEventLoop):
        self.models, self.settings, self.metrics, self.loop = models, settings, metrics, loop
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.next_job: Job | None = None  # taken from the queue, waiting for rows to free (worker thread)
        self.admitted = 0  # slots, from admit() until the choices end or the request fails; event loop only
        self.batch = Batch()
        self.prefilling: tuple[Job, list[Row], Prefill] | None = None  # a prompt prefilled in chunks (D72)
        self.prefill_budget = settings.max_prefill_tokens_per_step or PREFILL_TOKENS_PER_STEP["cpu"]  # set at load
        models.after_load.append(self._prepare)
        self.outbox = Outbox(loop, self.release, settings.stream_interval_ms / 1000)
        self._texts: TokenTexts | None = None
        self.thread = threading.Thread(target=self._run, name="generate-worker", daemon=True)
        self.thread.start()

    # -- called on the event loop

    def admit(self, slots: int = 1) -> None:
        """Take a request's slots (one per choice: each decodes as a row), or 429 before any
        media is decoded when running + queued would pass MAX_BATCH_SIZE + MAX_QUEUE."""
        if self.admitted + slots > self.settings.max_batch_size + self.settings.max_queue:
            raise QueueFull("The server is busy; retry shortly.", retry_after=2)
        self.admitted += slots

    def release(self, slots: int = 1) -> None:
        self.admitted -= slots

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
        self.release(job.params.n)
        for index in range(job.params.n):
            job.sink.finish("cancelled", 0, index)
        return True

    def stop(self) -> None:
        self.jobs.put(None)

    # -- the decode loop (worker thread)

    def _run(self) -> None:
        # this thread's torch thread count, set before its first op (which would take the
        # process default, lowered by the pools' set_num_threads): one, as measured (D30)
        torch.set_num_threads(1)
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
        for job in dict.fromkeys(row.job for row in rows):
            self._fail(job, sum(row.detokenizer.count for row in rows if row.job is job), exc)
        self.batch.drop(set(rows))

    def _admit_waiting(self) -> bool:
        """Prefill waiting jobs in order, at most MAX_PREFILL_TOKENS_PER_STEP prompt tokens
        between two decode steps: a longer prompt goes on where it left off after the next
        step (D72), and nothing overtakes it. A job whose choices do not fit in
        MAX_BATCH_SIZE rows yet waits for rows to free. False once stopped."""
        budget = self.prefill_budget
        while budget > 0:
            if self.prefilling is not None:
                budget -= self._prefill(budget)
                if self.prefilling is not None:
                    return True
                continue
            if self.next_job is None:
                if len(self.batch.rows) >= self.settings.max_batch_size:
                    return True
                try:
                    self.next_job = self.jobs.get(block=not self.batch.rows)
                except queue.Empty:
                    return True
                if self.next_job is None:
                    return False
            job = self.next_job
            if not job.claimed and len(self.batch.rows) + job.params.n > self.settings.max_batch_size:
                return True
            self.next_job = None
            if job.claim():
                self._start(job)
        return True

    def _start(self, job: Job) -> None:
        """Set up one job's choices and its prefill (the vision encoder runs here); a failure fails this job only."""
        timeout = self.settings.generation_timeout_seconds
        job.deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
        job.running = job.params.n
        try:
            rows = [self._new_row(job, index) for index in range(job.params.n)]
            self.prefilling = (job, rows, Prefill(self.models.model, job.inputs))
            job.inputs = None  # the prefill holds what it needs; the pixel values go now, not at the job's end
        except Exception as exc:  # e.g. media the vision tower rejects
            self._fail(job, 0, exc)

    def _prefill(self, budget: int) -> int:
        """The prefilling job's next chunk (the prompt tokens it ran); once its prompt is in,
        each choice's first token is sampled from the one prefill and its rows join the
        batch, each slot with its own copy of the prompt's cache. While no row decodes there
        is nobody to stall, and the rest of the prompt runs in one piece. Cancel and the
        time cap are checked between chunks, as between decode steps."""
        job, rows, prefill = self.prefilling
        if job.cancel.is_set() or job.timed_out:
            self.prefilling = None
            for row in rows:
                self._finish(row, "cancelled" if job.cancel.is_set() else "timeout")
            return 0
        ran = 0
        try:
            ran = prefill.run(budget if self.batch.rows else prefill.length)  # nobody to stall: one piece
            if not prefill.finished:
                return ran
            self.prefilling = None
            for row in rows:
                row.position, row.rope_delta = prefill.length, prefill.rope_delta
            tokens, logprobs = self._pick(rows, prefill.logits.expand(len(rows), -1))  # logits: [1, vocab]
        except Exception as exc:  # this job fails alone; the batch's cache is not touched
            self.prefilling = None
            self._fail(job, 0, exc)
            return ran
        try:
            self.batch.join(rows, prefill.cache, prefill.length)
        except Exception as exc:  # a half-copied slot is unusable for every row
            self._fail(job, 0, exc)
            self._fail_all(exc)
            return ran
        self._advance(rows, tokens, logprobs)
        self.outbox.send()
        return ran

    def _prepare(self, model) -> None:
        """At model load (loader thread, before the first job): the batch's KV cache, and the
        compiled decode step built for every batch size where COMPILE asks for it (D71)."""
        setting = self.settings.compile
        compiled = setting == "1" or (setting == "auto" and model.device.type == "cuda")
        self.prefill_budget = (self.settings.max_prefill_tokens_per_step
                               or PREFILL_TOKENS_PER_STEP.get(model.device.type, PREFILL_TOKENS_PER_STEP["cpu"]))
        with torch.inference_mode():
            self.batch.prepare(model, self.settings.max_batch_size, compiled)

    def _new_row(self, job: Job, index: int) -> Row:
        """Choice `index` of the job: its own pipeline, stops, penalties and generator (seed + index)."""
        p = job.params
        pipeline = TextPipeline(p.stop, job.reasoning, job.tools)
        seed = p.seed + index if p.seed is not None else secrets.randbits(63)
        penalties = ids = None
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            penalties = Penalties(job.prompt_tokens, p)
            ids = job.inputs["input_ids"].to(self.models.model.device)
        row = Row(job, Detokenizer(self.models.processor.tokenizer), pipeline,
                  Stopping(job, pipeline, self.models.eos_ids), penalties, torch.Generator().manual_seed(seed), ids,
                  index=index)
        row.constraint, row.budget = self._controls(job)
        return row

    def _controls(self, job: Job) -> tuple[RowConstraint | None, ReasoningBudget | None]:
        """The row's grammar state and reasoning budget; both wait for `</think>` only when the
        prompt opened a think block (D51, D53)."""
        close = self.models.think_close_id if job.reasoning else None
        constraint = RowConstraint(job.grammar, close, self.models.eos_ids) if job.grammar else None
        limit = job.params.max_reasoning_tokens
        budget = ReasoningBudget(limit, close) if limit is not None and close is not None else None
        return constraint, budget

    def _decode_step(self) -> None:
        rows = list(self.batch.rows)
        self.metrics.batch_size.observe(len(rows))
        try:
            logits = self.batch.forward()
            self._advance(rows, *self._pick(rows, logits))
        except Exception as exc:  # a failed forward leaves no row in a known state
            logger.exception("generation worker: decode step failed")
            self._fail_all(exc)

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's own logits rules, then sampling in groups of rows that sample alike; and
        the logprobs of the rows that asked for them (the others pay nothing)."""
        scores = self._adjust(rows, logits)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.job.params.sampler_key, []).append(i)
        tokens = [0] * len(rows)
        for members in groups.values():
            params = rows[members[0]].job.params
            group = scores if len(members) == len(rows) else scores[members]
            picked = sample_tokens(group, params, [rows[i].generator for i in members])
            for i, token in zip(members, picked):
                tokens[i] = token
        return tokens, self._logprobs(rows, scores, tokens)

    def _logprobs(self, rows: list[Row], scores: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        asking = [i for i, row in enumerate(rows) if row.job.params.logprobs]
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if asking:
            found = token_logprobs(scores[asking], [tokens[i] for i in asking],
                                   [rows[i].job.params.top_logprobs for i in asking], self.token_texts)
            for i, entry in zip(asking, found):
                entries[i] = entry
        return entries

    @property
    def token_texts(self) -> TokenTexts:
        if self._texts is None:
            self._texts = TokenTexts(self.models.processor.tokenizer)
        return self._texts

    def _adjust(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] scores: EOS masked until min_tokens (one indexed write for all such
        rows); then, row by row and only for rows that have them, logit_bias and OpenAI
        penalties, the reasoning budget and last the grammar, so no bias can lift a token
        either of them bans (D54). An active grammar decides EOS alone: min_tokens would
        leave a finished answer no legal token. The logits are not written to (after a
        prefill they are one row expanded to n)."""
        young = [i for i, row in enumerate(rows)
                 if row.generated < row.job.params.min_tokens and not (row.constraint and row.constraint.active)]
        ruled = [i for i, row in enumerate(rows)
                 if row.penalties is not None or row.budget is not None or row.constraint is not None]
        if not young and not ruled:
            return logits
        scores = logits.clone()
        if young:
            eos = torch.tensor(self.models.eos_ids, device=scores.device)
            scores[torch.tensor(young, device=scores.device)[:, None], eos[None, :]] = float("-inf")
        for i in ruled:
            row = rows[i]
            if row.penalties is not None:
                scores[i] = row.penalties(row.ids, scores[i][None])[0]
            if row.budget is not None:
                row.budget.mask(scores[i])  # in place, on this row of scores
            if row.constraint is not None:
                row.constraint.mask(scores[i])
        return scores

    def _advance(self, rows: list[Row], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Stream each row's new token and retire the rows that are done."""
        done: set[Row] = set()
        for row, token, entry in zip(rows, tokens, logprobs):
            if row in done:  # another choice of its job failed in this step
                continue
            try:
                reason = self._accept(row, token, entry)
            except Exception as exc:  # a bug in one row's text handling fails that job only
                choices = [r for r in self.batch.rows if r.job is row.job and r not in done]
                self._fail(row.job, sum(r.detokenizer.count for r in choices), exc)
                done.update(choices)
                continue
            if reason:
                self._finish(row, reason)
                done.add(row)
        if done:
            self.batch.drop(done)

    def _accept(self, row: Row, token: int, entry: TokenLogprob | None) -> str | None:
        """Take the row's new token through detokenizer and text pipeline; the reason it ends, if any.

        Its logprobs wait in row.pending until text is emitted; the EOS that ends a choice
        is not listed, nor are tokens after the last text (swallowed by a stop string).
        """
        row.generated += 1
        row.last = token
        if row.ids is not None:
            row.ids = torch.cat([row.ids, row.ids.new_tensor([[token]])], dim=1)
        if row.budget is not None:
            row.budget.advance(token)
        if row.constraint is not None:
            row.constraint.advance(token)  # ConstraintViolation fails this row's job alone (_advance)
        row.job.counts.generated += 1  # over all choices, for usage read while it runs
        if row.pipeline.split.reasoning:  # still thinking when this token came: a reasoning token
            row.job.counts.reasoning += 1
        if row.index == 0:  # latency metrics count requests, not choices
            self._on_token(row.job, row.generated)
        if entry is not None and token not in self.models.eos_ids:
            row.pending.append(entry)
        text = row.detokenizer.add(token)
        if text:
            self._emit(row, row.pipeline.feed(text))
        return row.stopping.reason(token, row.generated)

    def _finish(self, row: Row, reason: str) -> None:
        self._emit(row, row.pipeline.feed(row.detokenizer.flush()) + row.pipeline.flush())
        row.job.running -= 1
        self.outbox.post(row.job, "finish", row.stopping.final(reason), row.detokenizer.count, row.index, slots=1)

    def _fail(self, job: Job, tokens: int, exc: Exception) -> None:
        """End the job's choices that are still running (a job fails as a whole)."""
        logger.error("session %s generation failed: %s", job.id, type(exc).__name__, exc_info=exc)
        slots, job.running = job.running, 0
        self.outbox.post(job, "fail", f"Generation failed: {type(exc).__name__}.", tokens, slots=slots)

    def _on_token(self, job: Job, count: int) -> None:
        now = time.monotonic()
        if count == 1:
            self.metrics.ttft.observe(now - job.started)
        else:
            self.metrics.token_latency.observe(now - job.last_token_at)
        job.last_token_at = now

    def _emit(self, row: Row, pieces: list[Piece]) -> None:
        """Post the row's new pieces as deltas; its pending logprobs ride with the last one."""
        if not pieces:
            return
        deltas = [piece_delta(kind, value, row.index, [] if row.job.params.logprobs else None)
                  for kind, value in pieces]
        if row.pending:
            deltas[-1].logprobs, row.pending = row.pending, []
        self.outbox.post(row.job, "deltas", deltas)



# ----------------------------------------------------------------------------- event shapers

@dataclass
class Outcome:
    """How a session ended, as the log keeps it."""

    status: str = "in_progress"  # in_progress, completed, cancelled, failed, interrupted
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of the completion tokens, those up to and including `</think>`


class EventLog(Protocol):
    """What a shaper writes to: a session's append-only log (implemented in the sessions section)."""

    def append(self, data: str) -> int:
        """Add one event; returns its index."""

    def finish(self, outcome: Outcome) -> None:
        """Record how the session ended ([DONE] was appended just before)."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def token_logprob_json(entry: TokenLogprob) -> dict:
    """OpenAI's ChatCompletionTokenLogprob (the Responses API's output logprobs have the same shape)."""
    return {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in entry.top]}


def choice_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None
    return {"content": [token_logprob_json(e) for e in entries], "refusal": None}


def chunk_delta(delta: Delta, reasoning_fields: tuple[str, ...]) -> dict:
    """A delta as a chat.completion.chunk delta: reasoning under each of REASONING_FIELDS
    (D56); a call's start with its id, type and name, then its argument text (OpenAI's
    shape); {} when there is nothing to say (a call's end, reasoning sent nowhere)."""
    call = delta.call
    if delta.kind == "reasoning_content":
        return {field_name: delta.text for field_name in reasoning_fields}
    if isinstance(call, ToolCallStart):
        function = {"name": call.name, "arguments": ""}
        return {"tool_calls": [{"index": call.index, "id": call.id, "type": "function", "function": function}]}
    if isinstance(call, ToolCallArguments):
        return {"tool_calls": [{"index": call.index, "function": {"arguments": call.text}}]}
    return {"content": delta.text} if delta.kind == "content" else {}


def chat_usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": min(reasoning_tokens, completion_tokens)}}
# finish_reason stays inside OpenAI's enum (strictly typed clients reject other values);
# what the enum cannot say travels in the choice's `end_reason` extension (V5).
SPEC_FINISH_REASONS = {"cancelled": "stop", "timeout": "length"}


class ChatChunkShaper:
    """A GenerationSink that writes `chat.completion.chunk` events and `[DONE]` to a log.

    The one place that shapes chunks, finish reasons and usage; the non-streamed
    response is assembled from the same events (chat_completion_body). Each chunk
    carries one choice; with n choices, each has its own role chunk, deltas and finish
    chunk, and the usage chunk and [DONE] follow the last choice's end.
    """

    def __init__(self, log: EventLog, on_close: Callable[[Outcome], None], model: str, include_usage: bool,
                 prompt_tokens: int, truncated_messages: int = 0, choices: int = 1, logprobs: bool = False,
                 counts: TokenCounts | None = None,
                 reasoning_fields: tuple[str, ...] = ("reasoning_content", "reasoning")):
        self.log, self.on_close = log, on_close
        self.model, self.include_usage, self.prompt_tokens = model, include_usage, prompt_tokens
        self.truncated_messages = truncated_messages
        self.choices, self.logprobs = choices, logprobs
        self.reasons: dict[int, str] = {}  # finish reason of each choice that ended
        self.completion_tokens = 0  # all choices together
        self.counts, self.reasoning_fields = counts or TokenCounts(), reasoning_fields
        self.chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent: list[str] = []  # every event appended, whatever the ring keeps

    def start(self) -> None:
        """A role chunk per choice; the first also says how many old messages were dropped to
        fit the context. With logprobs asked they carry an empty list, so a body assembled
        from the events reports logprobs even for a choice that emitted no text."""
        extra = {"truncated_messages": self.truncated_messages} if self.truncated_messages else None
        for index in range(self.choices):
            self._chunk(index, {"role": "assistant", "content": ""}, logprobs=[] if self.logprobs else None,
                        extra=extra if index == 0 else None)

    def deltas(self, deltas: list[Delta]) -> None:
        """A chunk per delta; one with nothing to say is left out unless it carries logprobs."""
        for delta in deltas:
            chunk = chunk_delta(delta, self.reasoning_fields)
            if chunk or delta.logprobs:
                self._chunk(delta.index, chunk, logprobs=delta.logprobs)

    def finish(self, reason: str, completion_tokens: int, index: int = 0) -> None:
        spec = SPEC_FINISH_REASONS.get(reason, reason)
        self._chunk(index, {}, finish_reason=spec, end_reason=reason if spec != reason else None)
        self.reasons[index] = reason
        self.completion_tokens += completion_tokens
        if len(self.reasons) < self.choices:
            return
        if self.include_usage:
            self._append(dumps({**self._envelope(), "choices": [], "usage": self.usage(self.completion_tokens)}))
        status = "cancelled" if "cancelled" in self.reasons.values() else "completed"
        self._close(Outcome(status, self.reasons[0], self.prompt_tokens, self.completion_tokens,
                            self.counts.reasoning))

    def fail(self, message: str, completion_tokens: int) -> None:
        self.completion_tokens += completion_tokens
        self._append(dumps(error_body(message, "server_error", code="generation_failed")))
        self._close(Outcome("failed", None, self.prompt_tokens, self.completion_tokens, self.counts.reasoning))

    def usage(self, completion_tokens: int) -> dict:
        return chat_usage(self.prompt_tokens, completion_tokens, self.counts.reasoning)

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: list[TokenLogprob] | None = None, extra: dict | None = None,
               end_reason: str | None = None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": choice_logprobs(logprobs),
                  "finish_reason": finish_reason}
        if end_reason:
            choice["end_reason"] = end_reason
        self._append(dumps({**self._envelope(), "choices": [choice], **(extra or {})}))

    def _envelope(self) -> dict:
        return {"id": self.chunk_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _append(self, data: str) -> None:
        """Into the log, and into `sent`: the final result must not depend on how many
        events the log's ring keeps (a small SESSION_BUFFER_EVENTS answered 410)."""
        self.log.append(data)
        self.sent.append(data)

    def _close(self, outcome: Outcome) -> None:
        self._append("[DONE]")
        self.log.finish(outcome)
        self.on_close(outcome)


@dataclass
class ChoiceParts:
    """One choice of a chat.completion, as its chunks add up."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # the tool_calls entries of the deltas, in order
    logprobs: list[dict] | None = None  # None unless the request asked for logprobs
    finish_reason: str | None = None
    end_reason: str | None = None

    def add(self, choice: dict) -> None:
        delta = choice["delta"]
        self.content.append(delta.get("content") or "")
        self.reasoning.append(delta.get("reasoning_content") or delta.get("reasoning") or "")  # either field (D56)
        self.calls += delta.get("tool_calls") or []
        if choice.get("logprobs") is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(choice["logprobs"]["content"])
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.end_reason = choice.get("end_reason") or self.end_reason

    def body(self, index: int, reasoning_fields: tuple[str, ...]) -> dict:
        """The choice; content is null when the reply is only tool calls, as OpenAI sends it."""
        content, reasoning, calls = "".join(self.content), "".join(self.reasoning), merge_tool_call_deltas(self.calls)
        message = {"role": "assistant", "content": None if calls and not content else content, "refusal": None,
                   **{field_name: reasoning or None for field_name in reasoning_fields}}
        if calls:
            message["tool_calls"] = calls
        logprobs = None if self.logprobs is None else {"content": self.logprobs, "refusal": None}
        body = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {**body, "end_reason": self.end_reason} if self.end_reason else body


def merge_tool_call_deltas(entries: list[dict]) -> list[dict]:
    """message.tool_calls from the `tool_calls` entries of chunk deltas, in order."""
    calls: dict[int, dict] = {}
    for entry in entries:
        function = entry.get("function", {})
        if "id" in entry:
            calls[entry["index"]] = {"id": entry["id"], "type": "function",
                                     "function": {"name": function.get("name", ""), "arguments": ""}}
        calls[entry["index"]]["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def chat_completion_body(events: list[str], outcome: Outcome, session_id: str, created: int, model: str,
                         reasoning_fields: tuple[str, ...] = ("reasoning_content", "reasoning")) -> dict:
    """The chat.completion that a session's chunk events add up to, with the session's status."""
    choices: dict[int, ChoiceParts] = {}
    chunk_id, error, truncated = f"chatcmpl-{session_id}", None, 0
    for data in events:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        error = chunk.get("error", error)
        truncated = chunk.get("truncated_messages", truncated)
        chunk_id, created = chunk.get("id", chunk_id), chunk.get("created", created)
        for choice in chunk.get("choices", []):
            choices.setdefault(choice["index"], ChoiceParts()).add(choice)
    body = {"id": chunk_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choices.get(i, ChoiceParts()).body(i, reasoning_fields) for i in sorted(choices) or [0]],
            "usage": chat_usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.reasoning_tokens),
            "session_id": session_id, "status": outcome.status}
    if truncated:
        body["truncated_messages"] = truncated
    if error:
        body["error"] = error
    return body


def new_response(response_id: str, req: ResponsesRequest, model: str) -> dict:
    """The Response object as it stands before any output (openai's `Response` type)."""
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": bool(req.background), "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "model": model, "output": [], "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
        "store": req.store is not False, "temperature": req.temperature, "text": {"format": text_format(req)},
        "tool_choice": req.tool_choice or "auto", "tools": [response_tool(tool) for tool in req.tools or []],
        "top_p": req.top_p, "truncation": req.truncation or "disabled", "usage": None,
    }


def response_tool(tool: dict) -> dict:
    """A function tool as the Response echoes it (openai's `FunctionTool`)."""
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


# How a finish reason ends a response: (status, terminal event, incomplete_details reason).
# Cancelled ends with response.completed carrying status "cancelled" (V6): the union of
# stream events has no cancelled event, and the SDK's get_final_response() needs completed.
RESPONSE_ENDINGS = {
    "stop": ("completed", "response.completed", None),
    "tool_calls": ("completed", "response.completed", None),
    "cancelled": ("cancelled", "response.completed", None),
    "length": ("incomplete", "response.incomplete", "max_output_tokens"),
    "timeout": ("incomplete", "response.incomplete", "max_output_tokens"),
}


class ResponsesShaper:
    """A GenerationSink that writes Responses API stream events and `[DONE]` to a log (D37).

    Each event's sequence_number is its index in the log (both start at 0 with
    response.created), so `starting_after=N`, `Last-Event-ID: N` and the SSE id agree.
    Reasoning (before `</think>`) is a `reasoning` output item, the answer a `message`
    item, each tool call a `function_call` item (D57); output_index follows arrival order,
    as the SDK's stream helper asserts.
    `response` is the Response as it stands, what GET returns while this process holds it.
    """

    def __init__(self, log: EventLog, on_close: Callable[[Outcome], None], response: dict, prompt_tokens: int,
                 counts: TokenCounts):
        self.log, self.on_close, self.response = log, on_close, response
        self.prompt_tokens, self.counts = prompt_tokens, counts
        self.sequence = 0
        self.item: dict | None = None  # the output item deltas go to now

    def start(self) -> None:
        self._event("response.created", response=self.response)
        self._event("response.in_progress", response=self.response)

    def deltas(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            if delta.kind == "tool_call":
                self._tool_call(delta.call)
                continue
            kind, text = ("reasoning" if delta.kind == "reasoning_content" else "message"), delta.text
            if self.item is None or self.item["type"] != kind:
                self._close_item()
                self._open_item(kind)
            self.item["content"][0]["text"] += text
            event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            extra = {} if kind == "reasoning" else {"logprobs": []}
            self._event(event, **self._where(), delta=text, **extra)

    def finish(self, reason: str, completion_tokens: int, index: int = 0) -> None:
        """One choice only (the Responses API has no n): index is always 0."""
        status, event, incomplete = RESPONSE_ENDINGS[reason]
        self._close_item()
        self.response.update(status=status, usage=self.usage(completion_tokens), completed_at=int(time.time()),
                             incomplete_details={"reason": incomplete} if incomplete else None)
        if reason == "timeout":
            self.response["end_reason"] = "timeout"  # extension: what the enum cannot say
        self._event(event, response=self.response)
        self._close(Outcome(status, reason, self.prompt_tokens, completion_tokens, self.counts.reasoning))

    def fail(self, message: str, completion_tokens: int) -> None:
        self._close_item()
        self.response.update(status="failed", usage=self.usage(completion_tokens),
                             error={"code": "server_error", "message": message})
        self._event("response.failed", response=self.response)
        self._close(Outcome("failed", None, self.prompt_tokens, completion_tokens, self.counts.reasoning))

    def usage(self, completion_tokens: int) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(self.counts.reasoning, completion_tokens)},
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _tool_call(self, event: ToolCallEvent) -> None:
        """A call is its own output item; its arguments stream as function_call_arguments deltas."""
        if isinstance(event, ToolCallStart):
            self._close_item()
            self.item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": event.id,
                         "name": event.name, "arguments": "", "status": "in_progress"}
            self.response["output"].append(self.item)
            self._event("response.output_item.added", output_index=len(self.response["output"]) - 1, item=self.item)
        elif isinstance(event, ToolCallArguments):
            self.item["arguments"] += event.text
            self._event("response.function_call_arguments.delta", **self._item_where(), delta=event.text)
        else:
            self._close_item()

    def _open_item(self, kind: str) -> None:
        if kind == "reasoning":
            self.item = {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [], "status": "in_progress",
                         "content": [{"type": "reasoning_text", "text": ""}]}
        else:
            self.item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                         "status": "in_progress", "content": []}
        self.response["output"].append(self.item)
        self._event("response.output_item.added", output_index=len(self.response["output"]) - 1, item=self.item)
        if kind == "message":
            self.item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self._event("response.content_part.added", **self._where(), part=self.item["content"][0])

    def _close_item(self) -> None:
        item = self.item
        if item is None:
            return
        if item["type"] == "function_call":
            self._event("response.function_call_arguments.done", **self._item_where(), name=item["name"],
                        arguments=item["arguments"])
        elif item["type"] == "reasoning":
            self._event("response.reasoning_text.done", **self._where(), text=item["content"][0]["text"])
        else:
            self._event("response.output_text.done", **self._where(), text=item["content"][0]["text"], logprobs=[])
            self._event("response.content_part.done", **self._where(), part=item["content"][0])
        item["status"] = "completed"
        self._event("response.output_item.done", output_index=self._item_where()["output_index"], item=item)
        self.item = None

    def _item_where(self) -> dict:
        return {"item_id": self.item["id"], "output_index": self.response["output"].index(self.item)}

    def _where(self) -> dict:
        return {**self._item_where(), "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> None:
        self.log.append(dumps({"type": kind, "sequence_number": self.sequence, **fields}))
        self.sequence += 1

    def _close(self, outcome: Outcome) -> None:
        self.log.append("[DONE]")
        self.log.finish(outcome)
        self.on_close(outcome)


def response_from_events(events: list[str]) -> dict | None:
    """The Response that a log of Responses events adds up to (after a restart, when no
    shaper holds it). An error event that ended the log early (a crash, a failed store)
    makes it `failed` with that error's code."""
    response = None
    for data in events:
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if "response" in event:
            response = event["response"]
        elif "error" in event and response is not None:
            response.update(status="failed", error={"code": event["error"]["code"],
                                                    "message": event["error"]["message"]})
        elif response is not None:
            fold_output_event(response["output"], event)
    return response


def fold_output_event(output: list[dict], event: dict) -> None:
    kind = event.get("type")
    if kind == "response.output_item.added":
        output.append(event["item"])
    elif kind == "response.output_item.done":
        output[event["output_index"]] = event["item"]
    elif kind == "response.content_part.added":
        output[event["output_index"]]["content"].append(event["part"])
    elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
        output[event["output_index"]]["content"][event["content_index"]]["text"] += event["delta"]
    elif kind == "response.function_call_arguments.delta":
        output[event["output_index"]]["arguments"] += event["delta"]


def response_output_message(response: dict) -> dict:
    """A response's answer and calls as the next turn's assistant message (its reasoning is
    not fed back, D37)."""
    text = "".join(part.get("text", "") for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                       "arguments": item["arguments"]}}
             for item in response["output"] if item["type"] == "function_call"]
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


# ----------------------------------------------------------------------------- sessions

STORAGE_FAILED = "The session could not be stored (the session store failed); it ended early."
INTERRUPTED = "Generation was interrupted by a server restart."


@dataclass
class Event:
    index: int
    data: str


class SessionLog:
    """A session's append-only event log, kept in a memory ring buffer: an EventLog.

    A pure log (D6): append, read(after), follow(after), finish. Appends and reads
    happen on the event loop. Cancel belongs to the session and its job, not here.
    A log whose store failed for good is `broken`: it ends where its readers are, with
    an error event and [DONE], and ignores later appends (never a silent gap).
    """

    def __init__(self, session_id: str, capacity: int, next_index: int = 0, outcome: Outcome | None = None):
        self.session_id = session_id
        self.events: deque[Event] = deque(maxlen=capacity)
        self.next_index = next_index
        self.visible = next_index - 1
        self.outcome = outcome or Outcome()
        self.broken = False
        self.on_broken: Callable[[], None] | None = None
        self._changed = asyncio.Event()

    def append(self, data: str) -> int:
        if self.broken:
            return -1
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
        if not self.broken:
            self.outcome = outcome

    def end_early(self, message: str, code: str) -> None:
        """Close the log right after the last visible event with an error and [DONE], in
        memory only: what no reader has seen yet (it was never stored) is dropped."""
        if self.broken:
            return
        self.broken = True
        while self.events and self.events[-1].index > self.visible:
            self.events.pop()
        self.next_index = self.visible + 1
        for data in (dumps(error_body(message, "server_error", code=code)), "[DONE]"):
            self.events.append(Event(self.next_index, data))
            self.next_index += 1
        self.outcome = Outcome("failed" if code != "interrupted" else "interrupted", None,
                               self.outcome.prompt_tokens, self.outcome.completion_tokens,
                               self.outcome.reasoning_tokens)
        self.publish(self.next_index - 1)
        if self.on_broken is not None:
            self.on_broken()

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
        """Visible events with index > after, in order and without a gap; EventsGone if the
        first of them is no longer kept. Older events come from the store alone (no ring
        joined on), so the ring moving on during the read cannot open a gap."""
        if after + 1 < self.buffer_start:
            return await self._read_older(after, self.visible)
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

    async def _read_older(self, after: int, upto: int) -> list[Event]:
        raise EventsGone(f"Events after {after} are no longer kept (oldest kept: {self.buffer_start}).")

    async def follow(self, after: int) -> AsyncIterator[Event]:
        """Replay events after `after`, then follow live ones until [DONE]."""
        while True:
            changed = self._changed
            events = await self.read(after)
            for event in events:
                yield event
                after = event.index
            if self.drained and after >= self.next_index - 1:
                return
            if events and after < self.visible:  # older events came from the store: the rest is in the ring
                continue
            await changed.wait()

    async def wait_beyond(self, index: int) -> None:
        """Until an event after `index` is visible, or the log is drained."""
        while True:
            changed = self._changed
            if self.visible > index or self.drained:
                return
            await changed.wait()

    async def wait_drained(self) -> None:
        """Until [DONE] is visible (with SQLite: committed), so a result read then is whole."""
        while True:
            changed = self._changed
            if self.drained:
                return
            await changed.wait()


@dataclass(eq=False)
class WriteOp:
    """One SQL write for the writer thread."""

    sql: str
    args: tuple
    log: SessionLog | None = None  # the session the write belongs to
    index: int = -1  # the event index it makes durable, if any
    done: asyncio.Future | None = None  # resolved on the loop once committed (or failed for good)


class SQLiteWriter:
    """One thread that owns the write connection and commits in batches (group commit).

    Whatever queued up since the previous commit goes into the next transaction: at once
    when idle, at most every COMMIT_INTERVAL while events stream in. After each commit it
    tells the logs which of their events are durable (readers see only those).
    A failed transaction is retried; if it keeps failing (disk full), every session in
    it ends early with an error (SessionLog.end_early) and its later writes are dropped,
    so a later commit can never make visible an event that was not stored (D35).
    """

    COMMIT_INTERVAL = 0.025
    RETRY_DELAYS = (0.05, 0.2, 0.5)

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY, created REAL, finished REAL, status TEXT, finish_reason TEXT,
        prompt_tokens INTEGER, completion_tokens INTEGER, meta TEXT, reasoning_tokens INTEGER);
    CREATE TABLE IF NOT EXISTS events (
        session_id TEXT, idx INTEGER, data TEXT, PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
    """
    # columns a database written by an earlier version lacks
    MIGRATIONS = {"meta": "ALTER TABLE sessions ADD COLUMN meta TEXT",
                  "reasoning_tokens": "ALTER TABLE sessions ADD COLUMN reasoning_tokens INTEGER"}

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.loop = path, loop
        self.ops: queue.Queue[WriteOp | None] = queue.Queue()
        self.read_lock = threading.Lock()
        self.reader = self._connect()
        self.reader.executescript(self.SCHEMA)
        columns = {row[1] for row in self.reader.execute("PRAGMA table_info(sessions)")}
        for column, sql in self.MIGRATIONS.items():
            if column not in columns:
                self.reader.execute(sql)
        self.failed: weakref.WeakSet[SessionLog] = weakref.WeakSet()  # writer thread only
        self.failing = False  # an outage is under way (logged once)
        self.thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self.thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def submit(self, sql: str, args: tuple, log: SessionLog | None = None, index: int = -1) -> None:
        self.ops.put(WriteOp(sql, args, log, index))

    async def write(self, sql: str, args: tuple, log: SessionLog | None = None) -> None:
        """Submit and wait until committed; StoreUnavailable if it could not be."""
        done = self.loop.create_future()
        self.ops.put(WriteOp(sql, args, log, done=done))
        await done

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
            self._commit(conn, [op for op in batch if op is not None and op.log not in self.failed])
            last_commit = time.monotonic()
            if done:
                conn.close()
                return

    def _commit(self, conn: sqlite3.Connection, batch: list[WriteOp]) -> None:
        for delay in (*self.RETRY_DELAYS, None):
            try:
                self._transaction(conn, batch)
                break
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not self.failing:
                    self.failing = True
                    logger.error("sqlite write of %d ops failed (%s); retrying", len(batch), exc)
                if delay is None:
                    return self._give_up(batch)
                time.sleep(delay)
        if self.failing:
            self.failing = False
            logger.info("sqlite writes work again")
        self._report(batch)

    def _transaction(self, conn: sqlite3.Connection, batch: list[WriteOp]) -> None:
        conn.execute("BEGIN")
        for op in batch:
            conn.execute(op.sql, op.args)
        conn.execute("COMMIT")

    def _report(self, batch: list[WriteOp]) -> None:
        durable: dict[SessionLog, int] = {}
        for op in batch:
            if op.log is not None and op.index >= 0:
                durable[op.log] = max(durable.get(op.log, -1), op.index)
            if op.done is not None:
                self.loop.call_soon_threadsafe(settle, op.done, None)
        for log, index in durable.items():
            self.loop.call_soon_threadsafe(log.publish, index)

    def _give_up(self, batch: list[WriteOp]) -> None:
        logs = {op.log for op in batch if op.log is not None}
        logger.error("sqlite write of %d ops failed for good; %d sessions end early", len(batch), len(logs))
        for log in logs:
            self.failed.add(log)
            self.loop.call_soon_threadsafe(log.end_early, STORAGE_FAILED, "storage_failed")
        for op in batch:
            if op.done is not None:
                self.loop.call_soon_threadsafe(settle, op.done, StoreUnavailable("The session store is failing."))

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.read_lock:
            return self.reader.execute(sql, args).fetchall()


def settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(None)


class SQLiteSessionLog(SessionLog):
    """The same log, written through to SQLite; readers see committed events only."""

    def __init__(self, session_id: str, capacity: int, writer: SQLiteWriter, next_index: int = 0,
                 outcome: Outcome | None = None):
        super().__init__(session_id, capacity, next_index, outcome)
        self.writer = writer

    def __hash__(self) -> int:
        return id(self)

    def _store(self, event: Event) -> None:
        self.writer.submit("INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)",
                           (self.session_id, event.index, event.data), self, event.index)

    def finish(self, outcome: Outcome) -> None:
        if self.broken:
            return
        super().finish(outcome)
        self.writer.submit(
            "UPDATE sessions SET finished=?, status=?, finish_reason=?, prompt_tokens=?, completion_tokens=?, "
            "reasoning_tokens=? WHERE id=?", (time.time(), outcome.status, outcome.finish_reason,
                                              outcome.prompt_tokens, outcome.completion_tokens,
                                              outcome.reasoning_tokens, self.session_id), self)

    @property
    def oldest_kept(self) -> int:
        return 0

    async def _read_older(self, after: int, upto: int) -> list[Event]:
        """Every committed event in (after, upto]: all visible events are committed."""
        rows = await asyncio.to_thread(
            self.writer.query, "SELECT idx, data FROM events WHERE session_id=? AND idx>? AND idx<=? ORDER BY idx",
            (self.session_id, after, upto))
        return [Event(i, d) for i, d in rows]


def load_persisted(writer: SQLiteWriter, session_id: str, capacity: int) -> tuple[SQLiteSessionLog, dict] | None:
    """A session read back from SQLite (its events stay on disk until read).

    One still `in_progress` there is not generating in this process (those are in
    memory), so it died with an earlier one; if closing it at startup failed too (disk
    full), it reads as interrupted anyway, never as running forever.
    """
    # one statement, one snapshot: the row and its last event index agree even while the
    # writer commits
    rows = writer.query("SELECT status, finish_reason, prompt_tokens, completion_tokens, reasoning_tokens, meta, "
                        "(SELECT MAX(idx) FROM events WHERE session_id=?) FROM sessions WHERE id=?",
                        (session_id, session_id))
    if not rows:
        return None
    status, reason, prompt, completion, reasoning, meta, last = rows[0]
    log = SQLiteSessionLog(session_id, capacity, writer, next_index=(last if last is not None else -1) + 1,
                           outcome=Outcome(status, reason, prompt or 0, completion or 0, reasoning or 0))
    log.visible = log.next_index - 1
    return log, json.loads(meta or "{}")


def close_interrupted(writer: SQLiteWriter) -> int:
    """Sessions still generating when the last process died end as interrupted."""
    rows = writer.query("SELECT s.id, (SELECT MAX(idx) FROM events e WHERE e.session_id = s.id) "
                        "FROM sessions s WHERE s.status='in_progress'")
    error = dumps(error_body(INTERRUPTED, "server_error", code="interrupted"))
    for session_id, last in rows:
        nxt = (last if last is not None else -1) + 1
        for offset, data in enumerate((error, "[DONE]")):
            writer.submit("INSERT INTO events (session_id, idx, data) VALUES (?, ?, ?)",
                          (session_id, nxt + offset, data))
        writer.submit("UPDATE sessions SET status='interrupted', finished=? WHERE id=?", (time.time(), session_id))
    return len(rows)


# Redis (SESSION_STORE=redis): sessions shared by replicas (issue #11). Per session `key`
# (store_key(owner, id)), in braces so that all of a session's keys share one Redis
# Cluster slot (D60):
#    qwen:s:{key}             hash: status, owner (replica id), last (last stored index),
#                             finish_reason, prompt_tokens, completion_tokens, created,
#                             finished, key_hash, meta (JSON), cancel_requested, closed_by
#    qwen:s:{key}:events      stream: entry id 0-(index+1), fields i (index) and d (data)
#    qwen:s:{key}:listeners   hash: replica id -> readers there, _left (when the last left)
#    qwen:replica:{rid}       the replica's lease (SET PX, refreshed by its heartbeat)
#    qwen:replica:{rid}:cancels  set of session keys whose cancel that replica still owes
#    qwen:cancel              pub/sub channel of cancel requests
# RedisWriter (one thread, one pipeline per delivery), RedisSessionLog (the owner's log),
# RemoteSessionLog (read from another replica), ReplicaAgent (lease and cancels),
# RedisSessions (reserve, load, cancel, listeners, close_interrupted, delete).

ORPHAN_TTL_SECONDS = 86400.0  # a session nobody ever closes still expires
REPLICA_LOST = "Generation was interrupted: the replica running it stopped."
CANCEL_CHANNEL = "qwen:cancel"
DONE = "[DONE]"
OUTAGE = (RedisConnectionError, RedisTimeoutError)  # Redis unreachable: retried until it is back


def session_key(key: str) -> str:
    return f"qwen:s:{{{key}}}"


def events_key(key: str) -> str:
    return f"qwen:s:{{{key}}}:events"


def listeners_key(key: str) -> str:
    return f"qwen:s:{{{key}}}:listeners"


def lease_key(rid: str) -> str:
    return f"qwen:replica:{rid}"


def cancels_key(rid: str) -> str:
    return f"qwen:replica:{rid}:cancels"


def session_keys(key: str) -> list[str]:
    """The keys a session's scripts touch, in the order they expect them."""
    return [session_key(key), events_key(key), listeners_key(key)]


def sid_of(key: str) -> str:
    """The session id inside a store key, for logs (never the owner's key digest)."""
    return key.rsplit("/", 1)[-1]


def stream_id(index: int) -> str:
    """Entry id of event `index` (D61): 0-0 is not a valid id, so indexes start at 0-1."""
    return f"0-{index + 1}"


def new_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Any Redis failure as the one domain error the HTTP layer answers 503 to."""
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"The session store (Redis) is unavailable: {what} failed.", retry_after=1) from exc


# Lua: every script that changes a session checks its status first, so a replica's append
# and another's close of the same session can never both land (D62, D66).

STREAM_TOP = """
local function stream_top(stream)
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #top == 0 then return -1 end
  return tonumber(string.match(top[1][1], '%-(%d+)$')) - 1
end
local function close_with(error, status, closer, finished, ttl, maxlen)
  local last = stream_top(KEYS[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '0-' .. (last + 2), 'i', last + 1, 'd', error)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '0-' .. (last + 3), 'i', last + 2, 'd', '[DONE]')
  redis.call('HSET', KEYS[1], 'status', status, 'finish_reason', '', 'finished', finished, 'closed_by', closer,
             'last', last + 2)
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ttl) end
end
"""

# KEYS session, events, listeners. ARGV rid, created, key_hash, meta, orphan ttl ms.
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'owner', ARGV[1], 'created', ARGV[2], 'key_hash', ARGV[3],
           'meta', ARGV[4], 'last', -1, 'cancel_requested', 0, 'prompt_tokens', 0, 'completion_tokens', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS session, events, listeners. ARGV rid, first index, maxlen, n, n datas, then for
# the session's end: status, finish_reason, prompt, completion, finished, ttl ms.
# Returns {code, last stored index, cancel requested}.
APPEND = STREAM_TOP + """
local h = redis.call('HMGET', KEYS[1], 'status', 'owner', 'cancel_requested', 'closed_by')
if not h[1] then return {'missing', -1, 0} end
local cancel = tonumber(h[3] or 0)
local last = stream_top(KEYS[2])
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  if h[4] == ARGV[1] then return {'ok', last, cancel} end
  return {'closed', last, cancel}
end
local first, n = tonumber(ARGV[2]), tonumber(ARGV[4])
if n > 0 and first > last + 1 then return {'gap', last, cancel} end
local created = last == -1
for k = 0, n - 1 do
  local index = first + k
  if index > last then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-' .. (index + 1), 'i', index, 'd', ARGV[5 + k])
    last = index
  end
end
redis.call('HSET', KEYS[1], 'last', last)
local e = 5 + n
if #ARGV >= e then
  redis.call('HSET', KEYS[1], 'status', ARGV[e], 'finish_reason', ARGV[e + 1], 'prompt_tokens', ARGV[e + 2],
             'completion_tokens', ARGV[e + 3], 'finished', ARGV[e + 4], 'closed_by', ARGV[1],
             'reasoning_tokens', ARGV[e + 6])
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[e + 5]) end
elseif created and last >= 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return {'ok', last, cancel}
"""

# KEYS session, events, listeners, the owner's lease. ARGV owner, closer, error event,
# finished, ttl ms, least Redis uptime in seconds, maxlen. Returns 1 if this call closed it.
CLOSE_ORPHAN = STREAM_TOP + """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
if uptime < tonumber(ARGV[6]) then return 0 end
close_with(ARGV[3], 'interrupted', ARGV[2], ARGV[4], ARGV[5], ARGV[7])
return 1
"""

# KEYS session, events, listeners. ARGV owner, error event, finished, ttl ms, maxlen. The
# owner ends in Redis a session it cannot write on (Redis lost part of it, or refuses).
FAIL = STREAM_TOP + """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
close_with(ARGV[2], 'failed', ARGV[1], ARGV[3], ARGV[4], ARGV[5])
return 1
"""

# KEYS session, the owner's cancels set. ARGV owner, channel, message, key, set ttl ms.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'in_progress' and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cancel_requested', 1)
  redis.call('SADD', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return status
"""

# KEYS listeners, session. ARGV rid, +1 or -1. A replica's count that falls to 0 is
# removed and the time (Redis' clock) noted, so the owner knows how long nobody listened.
LISTEN = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], '_left', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return n
"""


def decode_entry(entry: tuple) -> Event:
    _, fields = entry
    return Event(int(fields[b"i"]), fields[b"d"].decode())


def contiguous(events: list[Event], after: int) -> list[Event]:
    """The events as read, if the first follows `after`; EventsGone if Redis trimmed it (D61)."""
    if events and events[0].index != after + 1:
        raise EventsGone(f"Events after {after} are no longer kept (oldest kept: {events[0].index}).")
    return events


# Redis writer

@dataclass(eq=False)
class Append:
    """One session's share of a delivery: events first.., then maybe the session's end."""

    log: RedisSessionLog
    first: int = -1
    datas: list[str] = field(default_factory=list)
    outcome: Outcome | None = None
    finished: float = 0.0

    def args(self, rid: str, ttl_ms: int) -> list:
        args = [rid, self.first, self.log.events.maxlen, len(self.datas), *self.datas]
        if self.outcome is not None:
            o = self.outcome
            args += [o.status, o.finish_reason or "", o.prompt_tokens, o.completion_tokens, self.finished, ttl_ms,
                     o.reasoning_tokens]
        return args


def group(ops: list[tuple]) -> list[Append]:
    """Submitted (log, event, outcome, time) in order, as one Append per session (two if
    something followed its end, which a shaper never does)."""
    calls: list[Append] = []
    open_: dict[RedisSessionLog, Append] = {}
    for log, event, outcome, at in ops:
        call = open_.get(log)
        if call is None or call.outcome is not None:
            call = open_[log] = Append(log)
            calls.append(call)
        if event is not None:
            call.first = event.index if not call.datas else call.first
            call.datas.append(event.data)
        if outcome is not None:
            call.outcome, call.finished = outcome, at
    return calls


class RedisWriter:
    """One thread that owns a sync client and writes every owned session's events (D63).

    The loop's appends of one iteration (one outbox delivery) become one batch, and one
    batch one pipeline: one EVALSHA per session touched. After Redis answers, the events
    it stored are published to the logs' readers (D62). An unreachable Redis is retried
    until it is back, logged once per outage; appends are idempotent (D61), so a retried
    pipeline never duplicates an event. After `degrade_after` seconds of outage the
    owner's readers get unconfirmed events from memory (D64). A session Redis lost, or
    closed meanwhile as interrupted, ends early; so does one whose writes Redis keeps
    refusing (out of memory) after RETRY_DELAYS.
    """

    RETRY_DELAYS = (0.05, 0.2, 0.5)  # Redis refused a command (OOM, ...): then give up
    MAX_OUTAGE_PAUSE = 0.5  # between reconnection attempts
    MAX_BATCHES = 256  # deliveries merged into one pipeline when they queued up (outage)

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, rid: str, *, ttl: float,
                 on_cancel: Callable[[str], None], degrade_after: float | None = 1.0):
        self.loop, self.rid, self.on_cancel, self.degrade_after = loop, rid, on_cancel, degrade_after
        self.ttl_ms = int(ttl * 1000)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1,
                                           retry=Retry(NoBackoff(), 0))  # retries are ours: counted and logged
        self.sha = ""  # APPEND's digest: loaded lazily, and again after a Redis restart
        self.pending: list[tuple] = []  # loop thread
        self.flush_scheduled = False
        self.unconfirmed = False  # loop thread: the owner's readers see events before Redis has them (D64)
        self.logs: weakref.WeakSet[RedisSessionLog] = weakref.WeakSet()  # loop thread
        self.told: weakref.WeakSet[RedisSessionLog] = weakref.WeakSet()  # loop thread: cancel passed on
        self.failed: weakref.WeakSet[RedisSessionLog] = weakref.WeakSet()  # writer thread
        self.unclosed: dict[str, int] = {}  # writer thread: ended early here, not yet in Redis (key -> maxlen)
        self.failing_since: float | None = None  # writer thread: an outage is under way
        self.degraded = False  # writer thread
        self.stop_by: float | None = None  # close(): give up retrying at this time
        self.ops: queue.Queue[list[tuple] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        self.thread.start()

    # loop thread

    def register(self, log: RedisSessionLog) -> None:
        self.logs.add(log)

    def submit(self, log: RedisSessionLog, event: Event | None = None, outcome: Outcome | None = None) -> None:
        self.pending.append((log, event, outcome, time.time()))
        if not self.flush_scheduled:  # once per loop iteration: one delivery, one pipeline
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.pending:
            self.ops.put(self.pending)
            self.pending = []

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (retrying an outage for at most `timeout`), then stop."""
        self._flush()
        self.stop_by = time.monotonic() + timeout
        self.ops.put(None)
        self.thread.join(timeout + 2)
        self.client.close()

    def _settle(self, results: list[tuple[RedisSessionLog, str, int, int]]) -> None:
        for log, code, last, cancel in results:
            if log.broken:
                continue
            if code == "ok":
                log.publish(last)
            elif code == "closed":  # another replica closed it: the same error event at the same index
                # as in Redis (unless readers here already saw unconfirmed events, D64)
                log.end_early(REPLICA_LOST, "interrupted")
            else:
                log.end_early(STORAGE_FAILED, "storage_failed")
            if cancel and log not in self.told:
                self.told.add(log)
                self.on_cancel(log.session_id)

    def _set_unconfirmed(self, on: bool) -> None:
        self.unconfirmed = on
        if on:
            for log in list(self.logs):
                if not log.broken:
                    log.publish(log.next_index - 1)

    def _tell(self, fn: Callable, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    # writer thread

    def _run(self) -> None:
        while True:
            try:
                batches = [self.ops.get(timeout=1.0 if self.unclosed else None)]
            except queue.Empty:
                self._close_unclosed()
                continue
            while len(batches) < self.MAX_BATCHES and not self.ops.empty():
                batches.append(self.ops.get_nowait())
            ops = [op for batch in batches if batch for op in batch if op[0] not in self.failed]
            if ops:
                self._write_safely(group(ops))
            if None in batches:
                return
            self._close_unclosed()

    def _write_safely(self, calls: list[Append]) -> None:
        try:
            self._write(calls)
        except Exception:  # an answer we do not expect must not stop the thread every session writes through
            logger.exception("redis writer failed on %d sessions", len(calls))
            self._give_up(calls, "writer error")

    def _write(self, calls: list[Append]) -> None:
        refusals = 0
        while calls:
            try:
                results = self._pipeline(calls)
            except OUTAGE as exc:
                if not self._outage(exc):
                    return self._give_up(calls, "redis unreachable at shutdown", reachable=False)
                continue
            self._recovered()
            calls, refused = self._report(calls, results)
            if refused:
                refusals += 1
                if refusals > len(self.RETRY_DELAYS):
                    return self._give_up(calls, f"redis refused: {refused}")
                time.sleep(self.RETRY_DELAYS[refusals - 1])

    def _pipeline(self, calls: list[Append]) -> list:
        if not self.sha:
            self.sha = self.client.script_load(APPEND)
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", self.sha, 3, *session_keys(call.log.session_id),
                                 *call.args(self.rid, self.ttl_ms))
        return pipe.execute(raise_on_error=False)

    def _report(self, calls: list[Append], results: list) -> tuple[list[Append], ResponseError | None]:
        """Settle what Redis answered; return the calls to send again and the last refusal."""
        again, refused, settled = [], None, []
        for call, result in zip(calls, results):
            if isinstance(result, NoScriptError):  # Redis restarted without its script cache
                self.sha, again = "", again + [call]
            elif isinstance(result, ResponseError):
                again.append(call)
                refused = result
            else:
                code, last, cancel = result[0].decode(), int(result[1]), int(result[2])
                if code != "ok":
                    self._fail(call.log, f"redis answered {code} at index {last}")
                settled.append((call.log, code, last, cancel))
        if settled:
            self._tell(self._settle, settled)
        return again, refused

    def _outage(self, exc: Exception) -> bool:
        """Wait before the next try; False once close() said to stop trying."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            logger.error("redis writes failing (%s); retrying until it is back", exc)
        if self.degrade_after is not None and not self.degraded and now - self.failing_since >= self.degrade_after:
            self.degraded = True
            logger.warning("redis down for %.1f s: owners' readers now get unconfirmed events",
                           now - self.failing_since)
            self._tell(self._set_unconfirmed, True)
        if self.stop_by is not None and now >= self.stop_by:
            return False
        time.sleep(min(self.MAX_OUTAGE_PAUSE, 0.05 + (now - self.failing_since) / 4))
        return True

    def _recovered(self) -> None:
        if self.failing_since is None:
            return
        logger.info("redis writes work again after %.1f s", time.monotonic() - self.failing_since)
        self.failing_since = None
        if self.degraded:
            self.degraded = False
            self._tell(self._set_unconfirmed, False)

    def _give_up(self, calls: list[Append], why: str, reachable: bool = True) -> None:
        logs = {call.log for call in calls}
        logger.error("redis write of %d sessions failed for good (%s); they end early", len(logs), why)
        for log in logs:
            self._fail(log, why, reachable)
        self._tell(self._settle, [(log, "failed", -1, 0) for log in logs])

    def _fail(self, log: RedisSessionLog, why: str, reachable: bool = True) -> None:
        """Drop the log's later writes and, if Redis still lets us, end it there too, so no
        reader elsewhere waits for a session this replica no longer writes."""
        self.failed.add(log)
        logger.error("session %s ends early (%s)", sid_of(log.session_id), why)
        if reachable:
            self.unclosed[log.session_id] = log.events.maxlen
            self._close_unclosed()

    def _close_unclosed(self) -> None:
        """End in Redis the sessions that ended early here; those Redis refuses now (out of
        memory) are tried again every second, so no reader elsewhere waits on them forever."""
        error = dumps(error_body(STORAGE_FAILED, "server_error", code="storage_failed"))
        for key, maxlen in list(self.unclosed.items()):
            try:
                self.client.eval(FAIL, 3, *session_keys(key), self.rid, error, time.time(), self.ttl_ms, maxlen)
            except RedisError:
                continue
            del self.unclosed[key]


# Redis logs

class RedisSessionLog(SessionLog):
    """The owner's log: the memory ring in front, Redis behind (D64).

    Appends go to the ring and to the writer; readers on this replica get an event once
    Redis stored it (publish-after-ack, as with SQLite), from the ring when it still
    holds it, else from the stream. Readers on other replicas use RemoteSessionLog.
    """

    def __init__(self, session_id: str, capacity: int, writer: RedisWriter, sessions: RedisSessions):
        super().__init__(session_id, capacity)
        self.writer, self.sessions = writer, sessions
        writer.register(self)

    def __hash__(self) -> int:
        return id(self)

    def _store(self, event: Event) -> None:
        self.writer.submit(self, event=event)
        if self.writer.unconfirmed:
            self.publish(event.index)

    def finish(self, outcome: Outcome) -> None:
        if self.broken:
            return
        super().finish(outcome)
        self.writer.submit(self, outcome=outcome)

    async def _read_older(self, after: int, upto: int) -> list[Event]:
        return await self.sessions.read_range(self.session_id, after, upto)


class RemoteSessionLog(SessionLog):
    """A session another replica generates or generated, read from Redis (D65).

    Read-only, with no ring of its own: read(after) is XRANGE from the cursor, follow(after)
    replays then blocks in XREAD for live entries until [DONE]. While it waits it checks
    the owner's lease, so a session whose replica died ends as interrupted (D66).
    `visible`, `next_index` and `outcome` are as of the last read.
    """

    OUTAGE_GRACE = 10.0  # seconds a follower waits for Redis to come back before it gives up

    def __init__(self, session_id: str, sessions: RedisSessions, info: SessionInfo, first: int):
        super().__init__(session_id, 0, info.last + 1, info.outcome)
        self.sessions, self.info, self.first = sessions, info, first

    def append(self, data: str) -> int:
        raise TypeError(f"session {self.session_id} is written by replica {self.info.owner}, not here")

    def finish(self, outcome: Outcome) -> None:
        raise TypeError(f"session {self.session_id} is written by replica {self.info.owner}, not here")

    @property
    def oldest_kept(self) -> int:
        return self.first

    async def read(self, after: int) -> list[Event]:
        events = await self.sessions.read_range(self.session_id, after)
        await self._saw(events)
        return events

    async def follow(self, after: int) -> AsyncIterator[Event]:
        for event in await self._riding_out(self.read, after):
            yield event
            after = event.index
        while not (self.closed and after >= self.next_index - 1):
            for event in await self._riding_out(self._live, after):
                yield event
                after = event.index

    async def wait_drained(self) -> None:
        async for _ in self.follow(self.visible):
            pass

    async def _saw(self, events: list[Event]) -> None:
        if not events:
            return
        self.next_index = max(self.next_index, events[-1].index + 1)
        self.visible = self.next_index - 1
        if events[-1].data == DONE:  # the session's end is stored in the same script as [DONE]
            await self.refresh()

    async def _riding_out(self, read: Callable, after: int) -> list[Event]:
        """`read(after)`, riding out a Redis outage shorter than OUTAGE_GRACE (a restart, a
        failover); a longer one raises StoreUnavailable."""
        since = time.monotonic()
        while True:
            try:
                return await read(after)
            except StoreUnavailable:
                if time.monotonic() - since > self.OUTAGE_GRACE:
                    raise
                await asyncio.sleep(0.25)

    async def _live(self, after: int) -> list[Event]:
        """The next live events, or [] after a quiet block (then the owner is checked)."""
        events = await self.sessions.read_live(self.session_id, after)
        if events:
            await self._saw(events)
        else:
            await self._check()
        return events

    async def _check(self) -> None:
        """Nothing new for a while: is the owner still there, is the session still kept?"""
        await self.sessions.close_interrupted(self.session_id, self.info)
        await self.refresh()

    async def refresh(self) -> None:
        info = await self.sessions.info(self.session_id)
        if info is None:
            raise EventsGone(f"Session {self.session_id} is no longer kept.")
        self.info, self.outcome = info, info.outcome
        self.next_index = max(self.next_index, info.last + 1)  # stored means visible: the loop reads on to it
        self.visible = self.next_index - 1


# Redis replica

class ReplicaAgent:
    """This replica's presence in Redis, on one daemon thread with a sync client (D66, D67).

    Every `beat` seconds it renews the lease `qwen:replica:{rid}` (PX lease) and takes the
    cancels owed to it from its set; between beats it listens on `qwen:cancel`. Pub/sub is
    the fast path (a cancel reaches on_cancel in ~1 ms) but at most once; the set catches
    what a dropped subscription missed, the writer's appends what both missed. A thread,
    not a task, so an event loop held up by other work cannot let the lease lapse.
    """

    def __init__(self, url: str, rid: str, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[str], None], *,
                 lease: float = 5.0, beat: float = 1.5):
        self.rid, self.loop, self.on_cancel, self.lease, self.beat = rid, loop, on_cancel, lease, beat
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1,
                                           retry=Retry(NoBackoff(), 0), health_check_interval=max(1, int(lease)))
        self.value = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        self.stopping = threading.Event()
        self.failing = False
        self.subscribed = threading.Event()  # tests wait on it
        self.thread = threading.Thread(target=self._run, name="redis-replica", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop beating and drop the lease: what this replica still owns may be closed at once."""
        self.stopping.set()
        self.thread.join(5)
        try:
            self.client.delete(lease_key(self.rid))
        except RedisError:
            pass
        self.client.close()

    def _run(self) -> None:
        pubsub = None
        while not self.stopping.is_set():
            try:
                pubsub = pubsub or self._subscribe()
                self._listen(pubsub)
                self._recovered()
            except RedisError as exc:
                self._failed(exc)
                pubsub = self._drop(pubsub)
                self.stopping.wait(0.25)
            except Exception:  # this thread keeps the lease: if it died, every session here would be closed
                logger.exception("redis replica agent error; going on")
                pubsub = self._drop(pubsub)
                self.stopping.wait(0.25)
        self._drop(pubsub)

    def _subscribe(self) -> redis.client.PubSub:
        """Subscribe, wait until Redis confirms, then beat and take the owed cancels: a cancel
        published before the confirmation is in the set, one after it comes as a message."""
        pubsub = self.client.pubsub()
        pubsub.subscribe(CANCEL_CHANNEL)
        while (message := pubsub.get_message(timeout=2)) is None or message["type"] != "subscribe":
            if message is None:
                raise RedisTimeoutError("no subscribe confirmation")
        self._beat()
        self.subscribed.set()
        return pubsub

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Messages until the next beat is due, then the beat."""
        due = time.monotonic() + self.beat
        while not self.stopping.is_set() and (left := due - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=min(left, 0.25))
            if message is not None and message["type"] == "message":
                self._on_message(message["data"])
        self._beat()

    def _beat(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(lease_key(self.rid), self.value, px=int(self.lease * 1000))
        pipe.smembers(cancels_key(self.rid))
        pipe.delete(cancels_key(self.rid))
        _, owed, _ = pipe.execute()
        for key in owed:
            self._tell(key.decode())

    def _on_message(self, data: bytes) -> None:
        try:
            request = json.loads(data)
            owner, key = request["owner"], request["key"]
        except (ValueError, TypeError, KeyError):
            logger.warning("ignored a malformed message on %s (%d bytes)", CANCEL_CHANNEL, len(data))
            return
        if owner == self.rid:
            self._tell(key)

    def _tell(self, key: str) -> None:
        try:
            self.loop.call_soon_threadsafe(self.on_cancel, key)
        except RuntimeError:  # the loop is closed
            pass

    def _failed(self, exc: Exception) -> None:
        self.subscribed.clear()
        if not self.failing:
            self.failing = True
            logger.error("redis lease and cancel channel failing (%s); retrying", exc)

    def _recovered(self) -> None:
        if self.failing:
            self.failing = False
            logger.info("redis lease and cancel channel work again")

    @staticmethod
    def _drop(pubsub: redis.client.PubSub | None) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except RedisError:
                pass
        return None


# Redis sessions

@dataclass
class SessionInfo:
    """A session's hash, parsed."""

    status: str
    owner: str
    last: int
    created: float
    finished: float | None
    key_hash: str
    meta: dict
    cancel_requested: bool
    outcome: Outcome

    @classmethod
    def parse(cls, h: dict[bytes, bytes]) -> SessionInfo:
        text = {k.decode(): v.decode() for k, v in h.items()}
        status = text["status"]
        outcome = Outcome(status, text.get("finish_reason") or None, int(text.get("prompt_tokens") or 0),
                          int(text.get("completion_tokens") or 0), int(text.get("reasoning_tokens") or 0))
        return cls(status=status, owner=text["owner"], last=int(text["last"]), created=float(text["created"]),
                   finished=float(text["finished"]) if text.get("finished") else None,
                   key_hash=text.get("key_hash", ""), meta=json.loads(text.get("meta") or "{}"),
                   cancel_requested=text.get("cancel_requested") == "1", outcome=outcome)


@dataclass
class Listeners:
    """Readers of a session on live replicas, and how long ago the last one elsewhere left."""

    live: int
    idle_for: float | None  # seconds since a replica's count last fell to 0; None if never


class RedisSessions:
    """What a replica asks of Redis about sessions, on the event loop (D68, D69).

    Every failure to reach Redis is StoreUnavailable (503). Two clients: one for quick
    commands (2 s socket timeout), one for XREAD BLOCK (its timeout outlasts the block).
    """

    PAGE = 512  # entries per XRANGE/XREAD

    def __init__(self, url: str, rid: str, *, capacity: int, ttl: float, lease: float = 5.0,
                 orphan_ttl: float = ORPHAN_TTL_SECONDS, block: float = 2.0):
        self.rid, self.capacity, self.lease, self.block = rid, capacity, lease, block
        self.ttl_ms, self.orphan_ttl_ms = int(ttl * 1000), int(orphan_ttl * 1000)
        retry = Retry(ExponentialBackoff(cap=0.25, base=0.02), 2)
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1, retry=retry)
        self.blocking = aioredis.Redis.from_url(url, socket_timeout=block + 3, socket_connect_timeout=1, retry=retry)
        self.scripts = {name: self.redis.register_script(src) for name, src in
                        (("reserve", RESERVE), ("close", CLOSE_ORPHAN), ("cancel", CANCEL), ("listen", LISTEN))}
        self.pending_detach: set[asyncio.Task] = set()

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()

    async def reserve(self, key: str, key_hash: str = "", meta: dict | None = None) -> None:
        """Claim `key` for this replica; SessionExists if any replica has it (D68)."""
        args = [self.rid, int(time.time()), key_hash, dumps(meta or {}), self.orphan_ttl_ms]
        with store_errors("reserving a session"):
            won = await self.scripts["reserve"](keys=session_keys(key), args=args)
        if not won:
            raise SessionExists(f"Session '{sid_of(key)}' already exists; resume it with Last-Event-ID.",
                                param="session_id")

    async def info(self, key: str) -> SessionInfo | None:
        with store_errors("reading a session"):
            h = await self.redis.hgetall(session_key(key))
        return SessionInfo.parse(h) if h else None

    async def load(self, key: str) -> tuple[RemoteSessionLog, dict] | None:
        """The session as another replica sees it (like load_persisted): None if Redis has
        no such key; one whose owner is gone is closed as interrupted first (D66)."""
        with store_errors("reading a session"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(session_key(key))
            pipe.xrange(events_key(key), count=1)
            h, head = await pipe.execute()
        if not h:
            return None
        info = SessionInfo.parse(h)
        if info.status == "in_progress" and await self.close_interrupted(key, info):
            return await self.load(key)
        first = decode_entry(head[0]).index if head else info.last + 1
        return RemoteSessionLog(key, self, info=info, first=first), info.meta

    async def read_range(self, key: str, after: int, upto: int | None = None) -> list[Event]:
        """Stored events in (after, upto], in pages; EventsGone if the first was trimmed."""
        events: list[Event] = []
        while upto is None or after < upto:
            with store_errors("reading events"):
                page = await self.redis.xrange(events_key(key), min=stream_id(after + 1),
                                               max=stream_id(upto) if upto is not None else "+", count=self.PAGE)
            batch = contiguous([decode_entry(e) for e in page], after)
            events += batch
            if len(page) < self.PAGE:
                break
            after = batch[-1].index
        return events

    async def read_live(self, key: str, after: int) -> list[Event]:
        """Events after `after`, waiting up to `block` seconds for one (XREAD BLOCK)."""
        with store_errors("following events"):
            reply = await self.blocking.xread({events_key(key): stream_id(after)}, count=self.PAGE,
                                              block=int(self.block * 1000))
        entries = (list(reply.values())[0] if isinstance(reply, dict) else reply[0][1]) if reply else []
        return contiguous([decode_entry(e) for e in entries], after)

    async def cancel(self, key: str) -> str | None:
        """Ask the owner, wherever it runs, to stop (D67); the status as it was, None if no such session."""
        info = await self.info(key)
        if info is None:
            return None
        message = json.dumps({"owner": info.owner, "key": key})
        args = [info.owner, CANCEL_CHANNEL, message, key, self.orphan_ttl_ms]
        with store_errors("cancelling a session"):
            status = await self.scripts["cancel"](keys=[session_key(key), cancels_key(info.owner)], args=args)
        return status.decode() if status else None

    async def close_interrupted(self, key: str, info: SessionInfo | None = None) -> bool:
        """End a session whose owner's lease is gone with the interrupted error and [DONE]
        (what SQLite's close_interrupted appends); of any number of replicas trying at once
        exactly one does it. Nothing while the owner's lease lives, nor within one lease
        period of a Redis restart, when leases may be missing from live owners (D66)."""
        info = info or await self.info(key)
        if info is None or info.status != "in_progress" or info.owner == self.rid:
            return False
        error = dumps(error_body(REPLICA_LOST, "server_error", code="interrupted"))
        args = [info.owner, self.rid, error, time.time(), self.ttl_ms, int(self.lease + 0.999), self.capacity]
        with store_errors("closing an orphaned session"):
            closed = await self.scripts["close"](keys=[*session_keys(key), lease_key(info.owner)], args=args)
        if closed:
            logger.warning("session %s closed as interrupted: replica %s is gone", sid_of(key), info.owner)
        return bool(closed)

    async def attach(self, key: str) -> None:
        """A reader on this replica started reading a session another replica owns (D69)."""
        with store_errors("counting a listener"):
            await self.scripts["listen"](keys=[listeners_key(key), session_key(key)], args=[self.rid, 1])

    async def detach(self, key: str) -> None:
        """That reader left. If Redis cannot be told now, it is retried for a minute; a
        count left behind only keeps auto-cancel off for that session, never cancels it."""
        try:
            await self.scripts["listen"](keys=[listeners_key(key), session_key(key)], args=[self.rid, -1])
        except RedisError:
            task = asyncio.get_running_loop().create_task(self._detach_later(key))
            self.pending_detach.add(task)
            task.add_done_callback(self.pending_detach.discard)

    async def _detach_later(self, key: str) -> None:
        for _ in range(60):
            await asyncio.sleep(1)
            try:
                await self.scripts["listen"](keys=[listeners_key(key), session_key(key)], args=[self.rid, -1])
                return
            except RedisError:
                continue
        logger.error("session %s: a listener count could not be taken back", sid_of(key))

    async def listeners(self, key: str) -> Listeners:
        """Readers on replicas whose lease is alive (a dead replica's count is ignored)."""
        with store_errors("counting listeners"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(listeners_key(key))
            pipe.time()
            counts, (seconds, micros) = await pipe.execute()
            replicas = {k.decode(): int(v) for k, v in counts.items() if k != b"_left" and int(v) > 0}
            pipe = self.redis.pipeline(transaction=False)
            for rid in replicas:
                pipe.exists(lease_key(rid))
            alive = await pipe.execute() if replicas else []
        left = counts.get(b"_left")
        idle = seconds + micros / 1e6 - float(left) if left else None
        return Listeners(sum(n for n, up in zip(replicas.values(), alive) if up), idle)

    async def delete(self, key: str) -> None:
        """Forget a session (a request that failed before generating, or a DELETE)."""
        with store_errors("deleting a session"):
            await self.redis.delete(*session_keys(key))

    async def owner_alive(self, rid: str) -> bool:
        with store_errors("reading a lease"):
            return bool(await self.redis.exists(lease_key(rid)))


def store_key(owner: str, session_id: str) -> str:
    """Where a session lives in the stores: inside its owner's namespace when API keys are
    on (D36), so another key can neither read it nor learn that the id is taken."""
    return f"{owner}/{session_id}" if owner else session_id


@dataclass(eq=False)
class Session:
    """A log plus who is listening to it; the auto-cancel timer runs while nobody is."""

    id: str  # what the client named it: SSE ids are `<id>:<index>`
    log: SessionLog
    key: str = ""  # store_key(owner, id)
    meta: dict = field(default_factory=dict)  # kind ("chat" or "response") and what another turn needs
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    listeners: int = 0
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    job: Job | None = None
    cancel_reason: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)  # the job's cancel flag (D6)
    shared: RedisSessions | None = None  # SESSION_STORE=redis: readers elsewhere count too (D69)
    _timer: asyncio.TimerHandle | None = None
    _checks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.key = self.key or self.id
        self.log.on_broken = partial(self.cancel, "storage")

    def attach(self) -> None:
        self.listeners += 1
        if self._timer:
            self._timer.cancel()
            self._timer = None

    def detach(self, cancel_after: float) -> None:
        self.listeners -= 1
        if self.listeners == 0:
            self.arm_auto_cancel(cancel_after)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "chat")

    @property
    def remote(self) -> bool:
        """Generated by another replica: read from Redis, cancelled through it."""
        return isinstance(self.log, RemoteSessionLog)

    def arm_auto_cancel(self, cancel_after: float) -> None:
        """Background responses run to the end unless cancelled: no timer for them, nor for
        another replica's session (its owner keeps the timer, D69)."""
        if self.meta.get("background") or self.remote:
            return
        if cancel_after > 0 and not self.done.is_set() and self._timer is None:
            self._rearm(cancel_after, cancel_after)

    def _rearm(self, delay: float, cancel_after: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._auto_cancel, cancel_after)

    def _auto_cancel(self, cancel_after: float) -> None:
        self._timer = None
        if self.listeners > 0 or self.done.is_set():
            return
        if self.shared is None:
            return self._cancel_unheard()
        task = asyncio.get_running_loop().create_task(self._auto_cancel_shared(cancel_after))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _auto_cancel_shared(self, cancel_after: float) -> None:
        """Nobody listens here; ask Redis about the other replicas (D69). Redis unreachable:
        try again later, never cancel on a guess."""
        try:
            heard = await self.shared.listeners(self.key)
        except StoreUnavailable:
            return self._rearm(min(cancel_after, 30.0), cancel_after)
        if self.listeners > 0 or self.done.is_set() or self._timer is not None:
            return
        if heard.live > 0:
            return self._rearm(cancel_after, cancel_after)
        if heard.idle_for is not None and heard.idle_for < cancel_after:
            return self._rearm(cancel_after - heard.idle_for, cancel_after)
        self._cancel_unheard()

    def _cancel_unheard(self) -> None:
        logger.info("session %s auto-cancelled: no listener", self.id)
        self.cancel("auto")

    def cancel(self, reason: str) -> None:
        """Ask the generation to stop; the reason is what metrics count it under."""
        self.cancel_reason = self.cancel_reason or reason
        self.cancel_event.set()

    def close(self, outcome: Outcome) -> None:
        """The generation ended (its [DONE] is in the log). The job stays for its counts and
        events; its prompt tensors go: a 640x480 image's pixel values are 5.75 MB, and every
        finished session kept them until it expired, so each new request faulted in fresh
        pages for its own (~2,000 page faults, +5-8 ms of preprocessing and prefill, #14)."""
        self.finished_at = time.time()
        if self.job is not None:
            self.job.inputs = None
        self.done.set()
        logger.info("session %s %s (%s, %d tokens)", self.id, outcome.status, outcome.finish_reason,
                    outcome.completion_tokens)


class SessionRegistry:
    """Sessions by store key: reservation, lookup (memory, then SQLite or Redis), expiry."""

    def __init__(self, settings: Settings, writer: SQLiteWriter | None):
        self.settings, self.writer = settings, writer
        self.sessions: dict[str, Session] = {}
        self.shared: RedisSessions | None = None  # SESSION_STORE=redis, after use_redis()
        self.redis_writer: RedisWriter | None = None
        self.agent: ReplicaAgent | None = None

    def use_redis(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        """Share sessions with other replicas through Redis. Nothing connects here: a Redis
        that is down at startup is retried, and what needs it answers 503 meanwhile (D60)."""
        s = self.settings
        rid = s.replica_id or new_replica_id()  # never reused after a restart (D66)
        on_cancel = partial(self.cancel_requested, worker)
        self.shared = RedisSessions(s.redis_url, rid, capacity=s.buffer_events, ttl=s.sessions_ttl_seconds,
                                    lease=s.redis_lease_seconds)
        self.redis_writer = RedisWriter(s.redis_url, loop, rid, ttl=s.sessions_ttl_seconds, on_cancel=on_cancel,
                                        degrade_after=1.0 if s.redis_local_fallback else None)
        self.agent = ReplicaAgent(s.redis_url, rid, loop, on_cancel, lease=s.redis_lease_seconds,
                                  beat=s.redis_lease_seconds / 3)
        self.agent.start()
        logger.info("sessions shared through redis as replica %s", rid)

    def cancel_requested(self, worker: Worker, key: str) -> None:
        """A cancel for a session this replica generates, asked on any replica (D67); may
        come more than once."""
        session = self.sessions.get(key)
        if session is not None and not session.done.is_set():
            session.cancel("manual")
            if session.job is not None:
                worker.cancel_waiting(session.job)

    async def close_redis(self) -> None:
        """Write what is queued, drop the lease (what is left here may be closed at once), disconnect."""
        await asyncio.to_thread(self.redis_writer.close)
        await asyncio.to_thread(self.agent.close)
        await self.shared.close()

    async def create(self, session_id: str | None, owner: str = "", meta: dict | None = None) -> Session:
        """Reserve an id before any slow work, so two requests cannot both claim it.

        The disk lookup comes first (off the loop); the memory check and the insert then
        run with no await between them, so of two requests for one new id only one wins.
        With SQLite the session row is committed before this returns, so a client that
        has been told the id finds the session after any crash (as interrupted at worst).
        """
        session_id = session_id or f"sess-{uuid.uuid4().hex}"
        key = store_key(owner, session_id)
        if self.shared is not None:
            return await self._create_shared(session_id, key, owner, meta or {})
        persisted = self.writer is not None and await asyncio.to_thread(self._persisted, key)
        if persisted or key in self.sessions:
            raise SessionExists(f"Session '{session_id}' already exists; resume it with Last-Event-ID.",
                                param="session_id")
        self._make_room()
        session = Session(session_id, self._new_log(key), key=key, meta=meta or {})
        self.sessions[key] = session
        if self.writer:
            try:
                await self.writer.write("INSERT INTO sessions (id, created, status, meta) VALUES (?, ?, 'in_progress', ?)",
                                        (key, time.time(), dumps(session.meta)), session.log)
            except StoreUnavailable:
                self.sessions.pop(key, None)
                raise
        return session

    async def _create_shared(self, session_id: str, key: str, owner: str, meta: dict) -> Session:
        """Reserved in Redis first: of two replicas asking for one id, one gets 409 (D68)."""
        if key in self.sessions:
            raise SessionExists(f"Session '{session_id}' already exists; resume it with Last-Event-ID.",
                                param="session_id")
        self._make_room()
        await self.shared.reserve(key, key_hash=owner, meta=meta)
        log = RedisSessionLog(key, self.settings.buffer_events, writer=self.redis_writer, sessions=self.shared)
        session = self.sessions[key] = Session(session_id, log, key=key, meta=meta, shared=self.shared)
        return session

    def _new_log(self, key: str) -> SessionLog:
        capacity = self.settings.buffer_events
        if self.writer:
            return SQLiteSessionLog(key, capacity, self.writer)
        return SessionLog(key, capacity)

    def _persisted(self, key: str) -> bool:
        return bool(self.writer.query("SELECT 1 FROM sessions WHERE id=?", (key,)))

    def _make_room(self) -> None:
        if len(self.sessions) < self.settings.max_sessions:
            return
        finished = sorted((s for s in self.sessions.values() if s.done.is_set()), key=lambda s: s.finished_at)
        if not finished:
            raise TooManySessions("Too many sessions in progress.", retry_after=5)
        for session in finished[: len(self.sessions) - self.settings.max_sessions + 1]:
            del self.sessions[session.key]

    async def discard(self, session: Session) -> None:
        """Forget a session whose request failed before generation started."""
        self.sessions.pop(session.key, None)
        if self.writer:
            self.writer.submit("DELETE FROM sessions WHERE id=?", (session.key,))
        if self.shared is not None:
            try:
                await self.shared.delete(session.key)
            except StoreUnavailable:  # it expires with ORPHAN_TTL_SECONDS
                logger.warning("session %s could not be deleted from redis", session.id)

    async def get(self, session_id: str, owner: str = "") -> Session:
        key = store_key(owner, session_id)
        session = self.sessions.get(key)
        if session is None and self.writer:
            found = await asyncio.to_thread(load_persisted, self.writer, key, self.settings.buffer_events)
            if found is not None:
                log, meta = found
                session = self.sessions.setdefault(key, Session(session_id, log, key=key, meta=meta,
                                                                finished_at=time.time()))
                if not log.closed:  # it died with an earlier process (see load_persisted)
                    log.end_early(INTERRUPTED, "interrupted")
                session.done.set()
        if session is None and self.shared is not None:
            session = await self._load_shared(session_id, key)
        if session is None:
            raise SessionNotFound(f"Session '{session_id}' not found.")
        return session

    async def _load_shared(self, session_id: str, key: str) -> Session | None:
        """A session another replica generates or generated. Not cached: its state is a
        snapshot as of the last read, and another replica may delete it (D65)."""
        found = await self.shared.load(key)
        if found is None:
            return None
        log, meta = found
        session = Session(session_id, log, key=key, meta=meta, created=int(log.info.created), shared=self.shared)
        if log.closed:
            session.finished_at = log.info.finished or time.time()
            session.done.set()
        return session

    async def delete(self, session: Session) -> None:
        """Forget a session in memory and in its store (its generation must have ended)."""
        if self.shared is not None:
            await self.shared.delete(session.key)  # StoreUnavailable (503) before anything is forgotten
        self.sessions.pop(session.key, None)
        if self.writer:
            self.writer.submit("DELETE FROM events WHERE session_id=?", (session.key,))
            self.writer.submit("DELETE FROM sessions WHERE id=?", (session.key,))

    def expire(self) -> None:
        cutoff = time.time() - self.settings.sessions_ttl_seconds
        for session in [s for s in self.sessions.values() if s.finished_at and s.finished_at < cutoff]:
            del self.sessions[session.key]
        if self.writer:
            self.writer.submit("DELETE FROM events WHERE session_id IN "
                               "(SELECT id FROM sessions WHERE finished IS NOT NULL AND finished < ?)", (cutoff,))
            self.writer.submit("DELETE FROM sessions WHERE finished IS NOT NULL AND finished < ?", (cutoff,))


# ----------------------------------------------------------------------------- http

SHUTDOWN_GRACE_SECONDS = 5.0
SSE_RETRY_MS = 1000  # how soon an EventSource reconnects after a drop
STREAM_HEAD_HOLD_SECONDS = 0.2  # a new stream's head waits this long at most for its first output (D74)
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


def owner_of(request: Request) -> str:
    """Whose sessions this request may see: the digest of its API key (set by APIKeyMiddleware)."""
    return request.scope.get("state", {}).get("owner", "")


def parse_last_event_id(request: Request) -> tuple[str, int] | None:
    """The resume point from the Last-Event-ID header, else the last_event_id query."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None:
        return None
    match = LAST_EVENT_ID.match(raw.strip())
    if not match or int(match["idx"]) < -1:
        raise invalid("Last-Event-ID must look like '<session_id>:<index>'.", "Last-Event-ID", "invalid_last_event_id")
    return match["sid"], int(match["idx"])


def sse_response(state: AppState, session: Session, after: int) -> EventSourceResponse | Response:
    """A reader of the session's log: replay after `after`, then follow live events.

    It knows nothing of shutdown: the app's one watcher ends the generations, and with
    them the streams, when server_exit is set.
    """
    if after > session.log.visible:
        raise invalid(f"Index {after} is beyond the session's last event.", "Last-Event-ID", "invalid_last_event_id")
    if after + 1 < session.log.oldest_kept:
        raise EventsGone(f"Events after {after} are no longer kept.", param="Last-Event-ID")
    if session.log.drained and after == session.log.next_index - 1:
        # nothing will ever follow [DONE]: 204 is how the HTML spec tells EventSource to stop (D39)
        return Response(status_code=204, headers={"X-Session-Id": session.id})
    settings = state.settings

    async def events():
        session.attach()
        counted = await count_listener(session, +1)
        try:
            async for event in session.log.follow(after):
                first = event.index == after + 1
                yield sse_event(session, event, retry=SSE_RETRY_MS if first else None)
        except EventsGone:  # this reader fell a whole buffer behind; a reconnect gets 410
            logger.warning("session %s reader fell behind the ring buffer", session.id)
        except StoreUnavailable as exc:  # Redis gone longer than a follower waits (D65): say so, no [DONE]
            logger.warning("session %s reader stopped: %s", session.id, exc.message)
            yield {"data": dumps(error_body(exc.message, "server_error", code="store_unavailable"))}
        finally:
            session.detach(settings.cancel_after_disconnect_seconds)
            if counted:
                await count_listener(session, -1)

    return EventSourceResponse(events(), ping=settings.sse_ping_seconds, send_timeout=settings.sse_send_timeout_seconds,
                               shutdown_event=state.server_exit, shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
                               headers={"X-Session-Id": session.id, "Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})


async def hold_head(state: AppState, session: Session) -> None:
    """Called right after start_session: wait, at most STREAM_HEAD_HOLD_SECONDS, for an event
    past the ones the shaper opened the log with (the first token, or the end), so that a
    quick first token leaves together with the head. Sent during the prefill, the head and
    the role chunk cost it ~3 ms of GIL hand-offs (D74, #14). Counted as a listener
    meanwhile, so the auto-cancel timer cannot fire on a held stream."""
    session.attach()
    try:
        async with asyncio.timeout(STREAM_HEAD_HOLD_SECONDS):  # not wait_for: its extra task is one more wake-up
            await session.log.wait_beyond(session.log.next_index - 1)
    except TimeoutError:
        pass
    finally:
        session.detach(state.settings.cancel_after_disconnect_seconds)


async def count_listener(session: Session, delta: int) -> bool:
    """A reader of another replica's session, counted in Redis so that its owner does not
    auto-cancel it (D69); whether it was counted. The owner counts its own in memory."""
    if not session.remote:
        return False
    if delta < 0:
        await session.shared.detach(session.key)
        return True
    try:
        await session.shared.attach(session.key)
        return True
    except StoreUnavailable:
        logger.warning("session %s: a reader could not be counted in redis", session.id)
        return False


LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def sse_event(session: Session, event: Event, retry: int | None) -> dict:
    """Chat events are `id: <session>:<index>`; Responses events are `id: <sequence_number>`
    (= index) with `event: <type>`, as OpenAI sends them."""
    if session.kind != "response":
        return {"id": f"{session.id}:{event.index}", "data": event.data, "retry": retry}
    kind = event.data[9:event.data.find('"', 9)] if event.data.startswith('{"type":"') else None
    return {"id": str(event.index), "event": kind, "data": event.data, "retry": retry}


async def read_json(request: Request) -> dict:
    """The body as a JSON object; whatever json.loads cannot take (invalid, nested past
    the recursion limit, an integer of 4,300+ digits) or text that is not Unicode (a
    lone surrogate) is a 400, never a 500."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        raise invalid("The body is not valid JSON (or nests or counts past this server's limits).", None,
                      "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.", None, "invalid_json")
    if LONE_SURROGATE_ESCAPE.search(raw):  # cheap test first: pairs are fine, lone halves are not text
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("The body holds a lone UTF-16 surrogate, which is not text.", None, "invalid_json") from None
    return body


def close_session(state: AppState, session: Session, outcome: Outcome) -> None:
    """A shaper's on_close: count the session in metrics and mark it done."""
    state.metrics.prompt_tokens.inc(outcome.prompt_tokens)
    state.metrics.completion_tokens.inc(outcome.completion_tokens)
    if outcome.status == "cancelled":
        state.metrics.cancellations.labels(session.cancel_reason or "unknown").inc()
    session.close(outcome)


def chat_shaper(state: AppState, req: ChatCompletionRequest, session: Session, prompt_tokens: int, dropped: int,
                counts: TokenCounts) -> ChatChunkShaper:
    return ChatChunkShaper(session.log, partial(close_session, state, session), state.settings.model_name,
                           bool(req.stream_options and req.stream_options.include_usage), prompt_tokens, dropped,
                           choices=req.n, logprobs=req.logprobs, counts=counts,
                           reasoning_fields=tuple(state.settings.reasoning_fields))


def responses_shaper(state: AppState, response: dict, session: Session, prompt_tokens: int, dropped: int,
                     counts: TokenCounts) -> ResponsesShaper:
    return ResponsesShaper(session.log, partial(close_session, state, session), response, prompt_tokens, counts)


async def prepare_job(state: AppState, req: ChatCompletionRequest, session: Session, make_sink: Callable) -> Job:
    """Fetch media, then decode it, apply the chat template and tokenize in one trip to the pool;
    `make_sink(session, prompt_tokens, dropped, counts)` shapes the events (chat or Responses)."""
    refuse_control_tokens(req, state.models.control_tokens)
    grammar = await prepare_grammar(state.models.grammars, req)  # before any media is fetched (D50)
    prompt, inputs, dropped = await prepare_prompt(req, state.settings, state.models.processor,
                                                   state.models.context_length, session.cancel_event)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    params = sampling_params(req, state.settings, prompt_tokens, state.models.context_length,
                             state.models.vocab_size)
    counts = TokenCounts()
    shaper = make_sink(session, prompt_tokens, dropped, counts)
    shaper.start()
    return Job(session.id, inputs, params, shaper, reasoning=prompt.rstrip().endswith(ReasoningSplitter.OPEN),
               prompt_tokens=prompt_tokens, cancel=session.cancel_event, started=session.started, counts=counts,
               grammar=grammar, tools=template_tools(req) is not None)


async def start_session(state: AppState, req: ChatCompletionRequest, owner: str, *, session_id: str | None = None,
                        meta: dict | None = None, make_sink: Callable | None = None) -> Session:
    """Admit, reserve the id, prepare and submit; every refusal comes before media is decoded.
    Chat by default; the Responses API passes its id, meta and shaper factory."""
    if state.shutting_down:
        raise ShuttingDown("The server is shutting down.", retry_after=10)
    check_media_counts(req, state.settings)
    check_choices(req, state.settings)
    state.worker.admit(req.n)  # one slot per choice (D15)
    session = None
    try:
        await state.models.ensure_loaded()
        session = await state.sessions.create(session_id or req.session_id, owner, meta)
        job = await prepare_job(state, req, session, make_sink or partial(chat_shaper, state, req))
    except BaseException:
        state.worker.release(req.n)
        if session is not None:
            await state.sessions.discard(session)
        raise
    session.job = job
    state.worker.submit(job)
    session.arm_auto_cancel(state.settings.cancel_after_disconnect_seconds)
    logger.info("session %s start (prompt %d tokens, max %d, stream=%s)", session.id,
                job.prompt_tokens, job.params.max_new_tokens, req.stream)
    return session


async def resume(state: AppState, session_id: str | None, point: tuple[str, int],
                 owner: str) -> EventSourceResponse | Response:
    sid, after = point
    if session_id and session_id != sid:
        raise invalid("Last-Event-ID names another session than the path or body.", "Last-Event-ID",
                      "invalid_last_event_id")
    session = await state.sessions.get(sid, owner)
    logger.info("session %s resume after %d", sid, after)
    state.metrics.resumes.inc()
    return sse_response(state, session, after)


async def completion_body(state: AppState, session: Session) -> dict:
    try:
        events = [e.data for e in await session.log.read(-1)]
    except EventsGone:  # the ring moved on: the live shaper still holds the whole result
        if session.job is None or not isinstance(session.job.sink, ChatChunkShaper):
            raise EventsGone("This session's events are no longer kept.") from None
        events = session.job.sink.sent
    outcome = session.log.outcome
    if not session.log.closed and session.job is not None:  # usage so far, not 0/0/0
        counts = session.job.counts
        outcome = Outcome(outcome.status, None, session.job.prompt_tokens, counts.generated, counts.reasoning)
    return chat_completion_body(events, outcome, session.id, session.created, state.settings.model_name,
                                tuple(state.settings.reasoning_fields))


async def wait_briefly(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


async def wait_for_completion(state: AppState, session: Session) -> JSONResponse:
    session.attach()
    try:
        await session.done.wait()
        await session.log.wait_drained()  # with SQLite: until the last event is committed (or failed)
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
    status = {"unloaded": "idle"}.get(models.state, models.state)  # idle: no load asked for yet
    return {"status": status, "model": state_of(request).settings.model_name, "error": models.error or None}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "local"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(state_of(request).settings.model_name)]}


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> dict:
    name = state_of(request).settings.model_name
    if model != name:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves '{name}'.", param="model")
    return model_card(name)


@router.post("/v1/chat/completions", openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": request_body_schema()}}}})
async def chat_completions(request: Request) -> Any:
    state = state_of(request)
    body = await read_json(request)
    point = parse_last_event_id(request)
    if point is not None:
        sid = body.get("session_id")
        return await resume(state, sid if isinstance(sid, str) else None, point, owner_of(request))
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > state.settings.max_messages:  # before pydantic's ~4 s per 550k
        raise invalid(f"At most {state.settings.max_messages} messages per request.", "messages", "too_many_messages")
    req = validate_request(body)
    refuse_unsupported(req)
    session = await start_session(state, req, owner_of(request))
    if req.stream:
        await hold_head(state, session)
        return sse_response(state, session, -1)
    return await wait_for_completion(state, session)


@router.get("/v1/chat/completions/{session_id}")
async def get_completion(request: Request, session_id: str, stream: bool = False) -> Any:
    state = state_of(request)
    point = parse_last_event_id(request)
    session = await state.sessions.get(session_id, owner_of(request))
    if stream:
        return await resume(state, session_id, point or (session_id, -1), owner_of(request))
    return JSONResponse(await completion_body(state, session), headers={"X-Session-Id": session.id})


@router.post("/v1/cancel/{session_id}")
async def cancel(request: Request, session_id: str) -> dict:
    state = state_of(request)
    session = await state.sessions.get(session_id, owner_of(request))
    await stop_session(state, session)
    return {"id": session_id, "object": "session", "status": session.log.outcome.status}


async def stop_session(state: AppState, session: Session) -> None:
    """Cancel a running generation and wait (briefly) until it has ended, so a read right
    after sees the final status; nothing to do for a finished one."""
    if session.done.is_set():
        return
    logger.info("session %s cancel requested", session.id)
    if session.remote:
        return await stop_remote(session)
    session.cancel("manual")
    if session.job is None or not state.worker.cancel_waiting(session.job):
        await wait_briefly(session.done, 5.0)


async def stop_remote(session: Session) -> None:
    """Ask the owner through Redis (D67), then follow the log to its end, 5 s at most."""
    if await session.shared.cancel(session.key) is None:
        raise SessionNotFound(f"Session '{session.id}' not found.")
    try:
        await asyncio.wait_for(session.log.wait_drained(), 5.0)
    except TimeoutError:
        pass


async def response_session(state: AppState, response_id: str, owner: str) -> Session:
    """A stored response of this key's, or 404 (chat sessions and unstored ones are not responses)."""
    session = await state.sessions.get(response_id, owner)
    if session.kind != "response" or (session.done.is_set() and session.meta.get("store") is False):
        raise SessionNotFound(f"Response '{response_id}' not found.")
    return session


async def response_snapshot(session: Session) -> dict:
    """The Response as it stands: the live shaper's while this process holds it, else
    what its events add up to (after a restart)."""
    if session.job is not None and isinstance(session.job.sink, ResponsesShaper):
        return session.job.sink.response
    response = response_from_events([e.data for e in await session.log.read(-1)])
    if response is None:
        raise EventsGone("This response's events are no longer kept.")
    return response


async def response_history(state: AppState, previous_id: str | None, owner: str) -> list[dict]:
    """The chat turns of a previous response (its input and answer, without its reasoning)."""
    if previous_id is None:
        return []
    try:
        previous = await response_session(state, previous_id, owner)
    except SessionNotFound:
        raise SessionNotFound(f"Previous response '{previous_id}' not found.", param="previous_response_id") from None
    if not previous.done.is_set():
        raise invalid("The previous response is still in progress.", "previous_response_id", "invalid_value")
    return previous.meta.get("messages", []) + [response_output_message(await response_snapshot(previous))]


def response_cursor(request: Request, starting_after: int | None) -> int:
    """Where a Responses stream resumes: starting_after, else Last-Event-ID, else from 0."""
    if starting_after is not None:
        after = starting_after
    else:
        raw = request.headers.get("last-event-id", "-1").strip()
        if not re.fullmatch(r"-?\d{1,18}", raw):
            raise invalid("Last-Event-ID must be a sequence number.", "Last-Event-ID", "invalid_last_event_id")
        after = int(raw)
    if after < -1:
        raise invalid("starting_after must be -1 or more.", "starting_after", "invalid_value")
    return after


@router.post("/v1/responses")
async def create_response(request: Request) -> Any:
    state, owner = state_of(request), owner_of(request)
    req = validate_request(await read_json(request), ResponsesRequest)
    refuse_unsupported_response(req)
    history = await response_history(state, req.previous_response_id, owner)
    chat = chat_request_of(req, history)
    refuse_unsupported(chat)
    response_id = f"resp_{uuid.uuid4().hex}"
    response = new_response(response_id, req, state.settings.model_name)
    meta = {"kind": "response", "background": bool(req.background), "store": req.store is not False,
            "messages": history + response_input_messages(req), "input_items": input_items(req)}
    session = await start_session(state, chat, owner, session_id=response_id, meta=meta,
                                  make_sink=partial(responses_shaper, state, response))
    if req.stream:
        await hold_head(state, session)
        return sse_response(state, session, -1)
    if req.background:
        return JSONResponse(response)
    session.attach()
    try:
        await session.done.wait()
        await session.log.wait_drained()
    finally:
        session.detach(state.settings.cancel_after_disconnect_seconds)
    if response["status"] == "failed":
        raise GenerationFailed((response.get("error") or {}).get("message", "Generation failed."))
    return JSONResponse(response)


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str, stream: bool = False,
                       starting_after: int | None = None) -> Any:
    state = state_of(request)
    session = await response_session(state, response_id, owner_of(request))
    if not stream:
        return JSONResponse(await response_snapshot(session))
    after = response_cursor(request, starting_after)
    logger.info("response %s stream after %d", response_id, after)
    state.metrics.resumes.inc()
    return sse_response(state, session, after)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> Any:
    """Idempotent: a finished response comes back unchanged."""
    state = state_of(request)
    session = await response_session(state, response_id, owner_of(request))
    await stop_session(state, session)
    return JSONResponse(await response_snapshot(session))


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict:
    state = state_of(request)
    session = await response_session(state, response_id, owner_of(request))
    await stop_session(state, session)
    await state.sessions.delete(session)
    logger.info("response %s deleted", response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str) -> dict:
    session = await response_session(state_of(request), response_id, owner_of(request))
    items = session.meta.get("input_items", [])
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}


STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page's own files only: no inline script or style, nothing from other origins, so a
# bug in the page's markdown renderer still could not run injected script (D47).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
page_router = APIRouter()  # included only with WEB_UI=1


@page_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def web_page() -> Response:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=PAGE_HEADERS)


# Domain errors to (status, type, code): the one place the engine's refusals meet HTTP.
ERROR_TABLE: dict[type[DomainError], tuple[int, str, str]] = {
    QueueFull: (429, "rate_limit_exceeded", "queue_full"),
    TooManySessions: (429, "rate_limit_exceeded", "too_many_sessions"),
    ModelLoading: (503, "server_error", "model_loading"),
    ModelLoadFailed: (503, "server_error", "model_load_failed"),
    ShuttingDown: (503, "server_error", "shutting_down"),
    SessionExists: (409, "invalid_request_error", "session_exists"),
    SessionNotFound: (404, "invalid_request_error", "not_found"),
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    EventsGone: (410, "invalid_request_error", "events_expired"),
    GenerationFailed: (500, "server_error", "generation_failed"),
    StoreUnavailable: (503, "server_error", "store_unavailable"),
    GrammarError: (400, "invalid_request_error", "invalid_schema"),
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
    # Connection: close, since Starlette re-raises after this answer and uvicorn then drops
    # the connection: a keep-alive client must not send its next request into it (D42)
    return JSONResponse(error_body(f"Internal server error (request id {rid}).", "server_error", None,
                                   "internal_error"), 500, headers={"Connection": "close"})


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
    """Pure ASGI: 413 for bodies over MAX_REQUEST_BYTES, by Content-Length or counted as they
    stream, and 408 for a body that has not all arrived within REQUEST_BODY_TIMEOUT_SECONDS
    (a client dripping bytes holds a connection and its buffer otherwise).

    The body is buffered here and replayed to the app; later receive() calls pass through,
    so SSE responses still see the client's disconnect.
    """

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            return await send_error(send, 408, error_body(
                f"The request body did not arrive within {self.timeout:g} s.", "invalid_request_error", None,
                "request_timeout"), [(b"connection", b"close")])
        if body is None:
            return await self._refuse(send)
        await self.app(scope, replay([body], receive), send)

    async def _read(self, receive) -> dict | None:
        """The whole body as one message (or the message that ended it); None when over the limit."""
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

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
    """The read-only credential for one session: HMAC-SHA256 of its id under the API key (D46)."""
    return hmac.new(key, b"qwen-read-token:v1:" + session_id.encode(), hashlib.sha256).hexdigest()


def key_owner(key: bytes) -> str:
    """A session owner's name: a digest of its API key, never the key (D36)."""
    return hashlib.sha256(key).hexdigest()[:24]


class APIKeyMiddleware:
    """Pure ASGI: `Authorization: Bearer <key>` on every /v1 route and the API docs when
    API_KEY is set; the matching key's digest becomes the request's session owner.

    A response naming a session (X-Session-Id) carries its read token (X-Read-Token);
    `?read_token=` alone opens `GET /v1/chat/completions/{id}` (result and stream) for
    that one session, for EventSource clients that cannot send headers (D46)."""

    PROTECTED = ("/v1", "/docs", "/redoc", "/openapi.json")  # the docs too (D41)

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]
        self.owners = [key_owner(k) for k in self.keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.PROTECTED) or scope["method"] == "OPTIONS":
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
        which = matches.index(True)
        scope.setdefault("state", {})["owner"] = self.owners[which]
        await self.app(scope, receive, with_read_token(send, self.keys[which]))

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
    writer = SQLiteWriter(settings.sessions_db_path, loop) if settings.store == "sqlite" else None
    if writer:
        interrupted = await asyncio.to_thread(close_interrupted, writer)
        try:  # wait until those closes are committed, so no lookup races them
            await writer.write("SELECT 1", ())
        except StoreUnavailable:
            logger.error("closing interrupted sessions failed (disk full?); lookups report them interrupted")
        logger.info("sessions db %s open (%d interrupted sessions closed)", settings.sessions_db_path, interrupted)
    metrics: Metrics = app.state.metrics
    state = AppState(settings, models, SessionRegistry(settings, writer), Worker(models, settings, metrics, loop),
                     writer, metrics, anyio.Event())
    if settings.store == "redis":
        state.sessions.use_redis(loop, state.worker)
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
    if state.sessions.shared is not None:
        await state.sessions.close_redis()
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
    if settings.web_ui:  # the chat page and its files, same origin as the API (no CORS)
        app.include_router(page_router)
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_middleware(app, settings)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost last: CORS answers preflights, then metrics, request ids, body limit, API keys."""
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes,
                       timeout=settings.request_body_timeout_seconds)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"],  # the OpenAI JS SDK sends X-Stainless-* headers
                           expose_headers=["X-Session-Id", "X-Request-Id", "X-Read-Token"])


class ReadTokenRedactor(logging.Filter):
    """uvicorn's access log prints query strings; a read token there is replaced by *** (D46)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(READ_TOKEN_IN_LOG.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


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
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ReadTokenRedactor) for f in access.filters):
        access.addFilter(ReadTokenRedactor())


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head: uvicorn has none, so a
    client sending half a header held its connection (and a file descriptor) forever."""

    head_timeout = 10.0  # set from REQUEST_HEAD_TIMEOUT_SECONDS in __main__

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle and self.head_timer is not None:  # a whole head arrived
            self.head_timer.cancel()
            self.head_timer = None
        elif self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()


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
    HeadDeadlineProtocol.head_timeout = settings.request_head_timeout_seconds
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=HeadDeadlineProtocol)
    GracefulServer(config, app).run()
