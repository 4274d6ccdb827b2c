// The chat page: one conversation kept in localStorage, answers streamed with resume.
//
// Every assistant message remembers its session id and the index of the last event it
// has shown (`lastIndex`), saved together with its text. A message still `pending` or
// `streaming` after a reload is picked up again from there (see stream.js): the server
// never generates an answer twice. Nothing here uses innerHTML; model text goes through
// markdown.js, which builds DOM nodes from text.

import { renderMarkdown } from "./markdown.js";
import { HTTPError, ResumableStream } from "./stream.js";

const STORE = { chat: "qwen3vl.chat.v1", settings: "qwen3vl.settings.v1", key: "qwen3vl.apiKey" };
const DEFAULTS = { system: "", temperature: 0.6, maxTokens: "", extra: "" };
const SAVE_EVERY_MS = 250;
// Streamed text is re-rendered at most this often. Rendering on every animation frame
// took so much CPU that the server beside it on 2 cores decoded 1,500 tokens in 21 s
// instead of 6 s; at 50 ms the page cost no measurable time (D48).
const RENDER_EVERY_MS = 50;
const LIVE = new Set(["pending", "streaming"]);
const $ = (selector) => document.querySelector(selector);

const state = {
  messages: loadJSON(STORE.chat, { messages: [] }).messages || [],
  settings: { ...DEFAULTS, ...loadJSON(STORE.settings, {}) },
  apiKey: localStorage.getItem(STORE.key) || "",
  attachments: [],  // waiting in the composer: {kind, name, type, size, url}
  streams: new Map(),  // message id -> ResumableStream
  views: new Map(),  // message id -> its element
  needsKey: false,
};

// ------------------------------------------------------------------ storage

function loadJSON(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

let saveTimer = null;

function scheduleSave() {
  saveTimer ??= setTimeout(saveNow, SAVE_EVERY_MS);
}

// Text and lastIndex are written in one setItem, so a reload resumes exactly after the
// text it shows. When the quota is hit, the oldest attachments give up their data first.
function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const stored = state.messages.map(({ ui, ...rest }) => rest);
  for (;;) {
    try {
      localStorage.setItem(STORE.chat, JSON.stringify({ v: 1, messages: stored }));
      return;
    } catch {
      const heavy = stored.flatMap((m) => m.attachments || []).find((a) => a.url);
      if (!heavy) return toast("This conversation is too large to keep in the browser.");
      heavy.url = null;
      heavy.dropped = true;
    }
  }
}

// Only unsaved changes: a stale tab going away must not write over what another tab saved.
function flushSave() {
  if (saveTimer !== null) saveNow();
}

function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
}

// ------------------------------------------------------------------ server and key

function authHeaders() {
  return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
}

async function checkHealth() {
  const badge = $("#server");
  try {
    const health = await (await fetch("/health", { cache: "no-store" })).json();
    badge.dataset.state = health.status;
    const name = (health.model || "").split("/").pop();
    $("#server-text").textContent = { ready: name, loading: "loading model…", idle: name }[health.status]
      || "model failed to load";
    badge.title = health.error || health.model || "";
    if (health.status !== "ready" && health.status !== "idle") setTimeout(checkHealth, 3000);
  } catch {
    badge.dataset.state = "offline";
    $("#server-text").textContent = "server unreachable";
    setTimeout(checkHealth, 3000);
  }
}

// /v1/models needs the key when the server has one: a 401 there means "ask for it".
async function checkAccess() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
    setNeedsKey(response.status === 401);
    return response.status !== 401;
  } catch {
    return true;  // unreachable is shown by the health badge, not as a key problem
  }
}

function setNeedsKey(needed, message = "") {
  state.needsKey = needed;
  $("#key-panel").hidden = !needed;
  $("#key-error").hidden = !message;
  $("#key-error").textContent = message;
  updateEmpty();
  updateComposer();
}

async function useKey(key) {
  state.apiKey = key.trim();
  if (!(await checkAccess())) {
    setNeedsKey(true, state.apiKey ? "The server refused this key." : "Enter a key first.");
    return false;
  }
  if (state.apiKey) localStorage.setItem(STORE.key, state.apiKey);
  else localStorage.removeItem(STORE.key);
  $("#set-key").value = state.apiKey;
  for (const stream of state.streams.values()) stream.nudge();
  return true;
}

// ------------------------------------------------------------------ requests

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function extraParams() {
  if (!state.settings.extra.trim()) return {};
  try {
    const extra = JSON.parse(state.settings.extra);
    return extra && typeof extra === "object" && !Array.isArray(extra) ? extra : {};
  } catch {
    return {};
  }
}

function userContent(message) {
  const parts = (message.attachments || []).filter((a) => a.url).map((a) => (a.kind === "video"
    ? { type: "video_url", video_url: { url: a.url } }
    : { type: "image_url", image_url: { url: a.url } }));
  if (!parts.length) return message.text;
  if (message.text) parts.push({ type: "text", text: message.text });
  return parts;
}

// The conversation up to `upTo` (a user message) as OpenAI messages. Turns the server
// refused are left out, and so is reasoning: the model's template drops it from history.
function chatMessages(upTo) {
  const out = state.settings.system.trim() ? [{ role: "system", content: state.settings.system }] : [];
  const turns = state.messages.slice(0, state.messages.indexOf(upTo) + 1);
  turns.forEach((m, i) => {
    const reply = turns[i + 1];
    if (m.role === "user" && !(reply && ["refused", "lost"].includes(reply.status))) {
      out.push({ role: "user", content: userContent(m) });
    } else if (m.role === "assistant" && m.content && ["completed", "cancelled"].includes(m.status)) {
      out.push({ role: "assistant", content: m.content });
    }
  });
  return out;
}

// Extra parameters from Settings win over the fields above them, never over the ones
// the page needs for resume (stream, session_id, usage).
function requestBody(userMessage, sessionId) {
  const { temperature, maxTokens } = state.settings;
  const body = { temperature: Number(temperature) };
  if (Number(maxTokens) > 0) body.max_tokens = Number(maxTokens);
  return JSON.stringify({
    ...body, ...extraParams(), messages: chatMessages(userMessage), stream: true, session_id: sessionId,
    stream_options: { include_usage: true },
  });
}

// ------------------------------------------------------------------ answers

function newAnswer() {
  return {
    id: crypto.randomUUID?.() || newSessionId(), role: "assistant", sessionId: newSessionId(), lastIndex: -1,
    status: "pending", reasoning: "", content: "", usage: null, finishReason: null, error: null,
    startedAt: Date.now(), firstTokenAt: null, reasoningEndAt: null, endedAt: null, timed: true,
  };
}

async function follow(message, body = null) {
  const stream = new ResumableStream({
    sessionId: message.sessionId, lastIndex: message.lastIndex, body, headers: authHeaders,
    onEvent: (event) => applyEvent(message, event),
    onState: (connection) => setConnection(message, connection),
  });
  state.streams.set(message.id, stream);
  updateComposer();
  try {
    await stream.run();
    if (LIVE.has(message.status) && !stream.stopped) await readResult(message);
  } catch (error) {
    await streamFailed(message, error);
  } finally {
    state.streams.delete(message.id);
    setConnection(message, null);
    saveNow();
    render(message);
    updateComposer();
  }
}

function applyEvent(message, { index, data }) {
  message.lastIndex = index;
  const now = Date.now();
  if (data === "[DONE]") {
    message.endedAt = now;
    message.status = message.error ? "failed" : message.finishReason === "cancelled" ? "cancelled" : "completed";
    saveNow();
    render(message);
    return;
  }
  message.status = "streaming";
  const chunk = JSON.parse(data);
  if (chunk.error) message.error = chunk.error.message || "The generation failed.";
  if (chunk.usage) message.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    const thought = delta.reasoning_content ?? delta.reasoning;  // the server may send either or both (REASONING_FIELDS)
    if (thought) {
      message.reasoning += thought;
      message.firstTokenAt ??= now;
    }
    if (delta.content) {
      message.content += delta.content;
      message.firstTokenAt ??= now;
      if (message.reasoning && !message.reasoningEndAt) message.reasoningEndAt = now;
    }
    if (choice.finish_reason) message.finishReason = choice.end_reason || choice.finish_reason;
  }
  scheduleSave();
  scheduleRender(message);
}

// The stream ended without [DONE] on our side (the server says nothing follows): the
// stored result is the whole answer.
async function readResult(message) {
  try {
    const response = await fetch(`/v1/chat/completions/${encodeURIComponent(message.sessionId)}`,
      { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) throw new HTTPError(response.status, await response.json().catch(() => null));
    const result = await response.json();
    const reply = result.choices?.[0]?.message || {};
    Object.assign(message, {
      content: reply.content || "", reasoning: reply.reasoning_content ?? reply.reasoning ?? "", usage: result.usage,
      finishReason: result.choices?.[0]?.end_reason || result.choices?.[0]?.finish_reason, error: result.error?.message || null,
      status: { in_progress: "streaming", interrupted: "lost" }[result.status] || result.status,
    });
  } catch (error) {
    message.status = "lost";
    message.error = `This answer is no longer on the server (${error.message}).`;
  }
}

async function streamFailed(message, error) {
  const refused = error instanceof HTTPError && message.lastIndex < 0 && message.status === "pending";
  if (refused && error.status !== 404) {
    message.status = "refused";
    message.error = error.message;
  } else if (error instanceof HTTPError && error.status === 410) {
    await readResult(message);
  } else {
    message.status = "lost";
    message.error = error.status === 404
      ? "The server no longer has this answer (it may have restarted)."
      : `The answer could not be resumed: ${error.message}`;
  }
}

function setConnection(message, connection) {
  message.ui = { ...message.ui, connection };
  if (connection === "reconnecting") message.timed = false;  // the page's clock no longer times the model
  if (connection === "waiting-key") checkAccess();
  render(message);
}

async function send(text) {
  if (state.streams.size || state.needsKey) return;
  const user = { id: crypto.randomUUID?.() || newSessionId(), role: "user", text, at: Date.now(),
    attachments: state.attachments.map(({ kind, name, type, size, url }) => ({ kind, name, type, size, url })) };
  const answer = newAnswer();
  state.messages.push(user, answer);
  state.attachments = [];
  renderAttachments();
  saveNow();
  renderAll();
  scrollToBottom(true);
  await follow(answer, requestBody(user, answer.sessionId));
}

function retry(answer) {
  const at = state.messages.indexOf(answer);
  const user = state.messages[at - 1];
  const fresh = newAnswer();
  state.messages.splice(at, 1, fresh);
  state.views.get(answer.id)?.remove();
  state.views.delete(answer.id);
  saveNow();
  renderAll();
  follow(fresh, requestBody(user, fresh.sessionId));
}

async function stop() {
  const running = state.messages.find((m) => state.streams.has(m.id));
  if (!running) return;
  $("#stop").disabled = true;
  try {
    const response = await fetch(`/v1/cancel/${encodeURIComponent(running.sessionId)}`,
      { method: "POST", headers: authHeaders() });
    if (!response.ok) toast((await response.json().catch(() => null))?.error?.message || "Could not stop.");
  } catch {
    toast("Could not reach the server to stop the answer; it keeps trying to reconnect.");
  } finally {
    $("#stop").disabled = false;
  }
}

// ------------------------------------------------------------------ rendering

const pending = new Set();
let frame = null;

function scheduleRender(message) {
  pending.add(message);
  frame ??= setTimeout(() => requestAnimationFrame(() => {
    frame = null;
    const stick = nearBottom();
    for (const m of pending) render(m);
    pending.clear();
    if (stick) scrollToBottom();
  }), RENDER_EVERY_MS);
}

function renderAll() {
  const list = $("#messages");
  const wanted = state.messages.map((m) => view(m));
  list.replaceChildren(...wanted);
  for (const m of state.messages) if (m.role === "assistant") render(m);
  updateEmpty();
}

function view(message) {
  let node = state.views.get(message.id);
  if (!node) {
    node = message.role === "user" ? userView(message) : $("#tpl-assistant").content.firstElementChild.cloneNode(true);
    node.dataset.id = message.id;
    node.dataset.role = message.role;
    if (message.role === "assistant") {
      node.querySelector(".retry").addEventListener("click", () => retry(message));
      node.querySelector(".copy-answer").addEventListener("click", () => copyText(message.content));
      node.querySelector(".thinking").addEventListener("toggle", (e) => {
        if (e.target.open !== thinkingShouldBeOpen(message)) message.ui = { ...message.ui, pinned: true };
      });
    }
    state.views.set(message.id, node);
  }
  return node;
}

function userView(message) {
  const node = document.createElement("article");
  node.className = "msg user";
  if (message.attachments?.length) {
    const strip = document.createElement("div");
    strip.className = "user-media";
    for (const a of message.attachments) strip.append(mediaThumb(a));
    node.append(strip);
  }
  if (message.text) {
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = message.text;
    node.append(bubble);
  }
  return node;
}

function mediaThumb(attachment) {
  if (!attachment.url) {
    const gone = document.createElement("div");
    gone.className = "thumb gone";
    gone.textContent = `${attachment.kind} not kept`;
    gone.title = `${attachment.name}: removed from this browser's storage to make room`;
    return gone;
  }
  const media = document.createElement(attachment.kind === "video" ? "video" : "img");
  media.className = "thumb";
  media.src = attachment.url;
  if (attachment.kind === "video") Object.assign(media, { muted: true, controls: true, preload: "metadata" });
  else media.alt = attachment.name;
  return media;
}

function thinkingShouldBeOpen(message) {
  return LIVE.has(message.status) && !message.content;
}

function render(message) {
  if (message.role !== "assistant") return;
  const node = view(message);
  const live = LIVE.has(message.status);
  node.dataset.status = message.status;
  node.dataset.session = message.sessionId;
  node.classList.toggle("live", live);

  const thinking = node.querySelector(".thinking");
  thinking.hidden = !message.reasoning;
  if (!message.ui?.pinned) thinking.open = thinkingShouldBeOpen(message);
  node.querySelector(".thinking-label").textContent = thinkingLabel(message);
  thinking.classList.toggle("active", live && !message.content);
  const thoughts = node.querySelector(".thinking-body");
  if (thoughts.dataset.text !== message.reasoning) {
    thoughts.replaceChildren(renderMarkdown(message.reasoning));
    thoughts.dataset.text = message.reasoning;
    if (live) thoughts.scrollTop = thoughts.scrollHeight;  // follow the thinking as it grows
  }
  const answer = node.querySelector(".answer");
  if (answer.dataset.text !== message.content) {
    answer.replaceChildren(renderMarkdown(message.content));
    answer.dataset.text = message.content;
  }
  answer.classList.toggle("waiting", live && !message.content && !message.reasoning);

  const connection = message.ui?.connection;
  const conn = node.querySelector(".conn");
  const label = { reconnecting: "reconnecting…", busy: "the server is busy; trying again…",
    "waiting-key": "waiting for the API key…" }[connection];
  conn.hidden = !label;
  node.querySelector(".conn-text").textContent = label || "";
  node.dataset.connection = connection || "";

  const notice = node.querySelector(".notice");
  const text = noticeText(message);
  notice.hidden = !text;
  notice.textContent = text;
  notice.className = `notice ${message.error ? "error" : ""}`;
  node.querySelector(".stats").textContent = live ? "" : statsText(message);
  node.querySelector(".retry").hidden = !["refused", "lost", "failed"].includes(message.status);
  node.querySelector(".copy-answer").hidden = live || !message.content;
}

function thinkingLabel(message) {
  if (LIVE.has(message.status) && !message.content) return "Thinking…";
  const seconds = message.timed && message.reasoningEndAt && message.firstTokenAt
    ? (message.reasoningEndAt - message.firstTokenAt) / 1000 : null;
  return seconds === null ? "Thoughts" : `Thought for ${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
}

function noticeText(message) {
  if (message.error) return message.status === "refused" ? `The server refused this message: ${message.error}`
    : message.error;
  return {
    cancelled: "Stopped.", length: "Stopped at the token limit.", timeout: "Stopped: the generation took too long.",
  }[message.status === "cancelled" ? "cancelled" : message.finishReason] || "";
}

function statsText(message) {
  const usage = message.usage;
  if (!usage) return "";
  const parts = [`${usage.completion_tokens.toLocaleString()} tokens`];
  const seconds = message.timed && message.endedAt && message.firstTokenAt
    ? (message.endedAt - message.firstTokenAt) / 1000 : 0;
  if (seconds > 0.05) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`, `${seconds.toFixed(1)} s`);
  parts.push(`prompt ${usage.prompt_tokens.toLocaleString()}`);
  return parts.join(" · ");
}

function updateEmpty() {
  $("#empty").hidden = state.messages.length > 0 || state.needsKey;
}

function updateComposer() {
  const busy = state.streams.size > 0;
  const text = $("#prompt").value.trim();
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  $("#send").disabled = state.needsKey || (!text && !state.attachments.length);
  $("#new-chat").disabled = busy;
  $("#prompt").placeholder = state.needsKey ? "Enter the API key above to chat" : "Message Qwen3-VL…";
}

function nearBottom() {
  const s = $("#scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom(smooth = false) {
  const s = $("#scroller");
  s.scrollTo({ top: s.scrollHeight, behavior: smooth ? "smooth" : "auto" });
}

function toast(text) {
  const node = document.createElement("div");
  node.className = "toast";
  node.textContent = text;
  $("#toasts").append(node);
  setTimeout(() => node.classList.add("leaving"), 4500);
  setTimeout(() => node.remove(), 5000);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    toast("Copied.");
  } catch {
    toast("Copying needs a secure (https or localhost) page.");
  }
}

// ------------------------------------------------------------------ attachments

function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
    if (!kind) {
      toast(`${file.name || "That file"} is not an image or a video.`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.attachments.push({ kind, name: file.name || `pasted ${kind}`, type: file.type, size: file.size,
        url: reader.result });
      renderAttachments();
    };
    reader.onerror = () => toast(`Could not read ${file.name}.`);
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  const row = $("#attachments");
  row.hidden = !state.attachments.length;
  row.replaceChildren(...state.attachments.map((a, i) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    chip.dataset.kind = a.kind;
    chip.append(mediaThumb(a));
    const label = document.createElement("span");
    label.className = "chip-label";
    label.textContent = `${a.name} · ${formatBytes(a.size)}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.setAttribute("aria-label", `Remove ${a.name}`);
    remove.textContent = "×";
    remove.addEventListener("click", () => {
      state.attachments.splice(i, 1);
      renderAttachments();
    });
    chip.append(label, remove);
    return chip;
  }));
  updateComposer();
}

function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

// ------------------------------------------------------------------ wiring

function wireComposer() {
  const prompt = $("#prompt");
  const grow = () => {
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, window.innerHeight * 0.4)}px`;
    updateComposer();
  };
  prompt.addEventListener("input", grow);
  prompt.addEventListener("keydown", (e) => {
    const touch = matchMedia("(pointer: coarse)").matches;
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touch) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  prompt.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if ((!text && !state.attachments.length) || state.streams.size || state.needsKey) return;
    prompt.value = "";
    grow();
    send(text);
  });
  $("#stop").addEventListener("click", stop);
  $("#attach").addEventListener("click", () => $("#file").click());
  $("#file").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  for (const button of document.querySelectorAll("[data-suggest]")) {
    button.addEventListener("click", () => {
      prompt.value = button.dataset.suggest;
      grow();
      prompt.focus();
    });
  }
}

function wireDrop() {
  let depth = 0;
  const overlay = $("#drop");
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth++;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  window.addEventListener("dragover", (e) => hasFiles(e) && e.preventDefault());
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    addFiles([...e.dataTransfer.files]);
  });
}

function wireSettings() {
  const dialog = $("#settings");
  const s = state.settings;
  const fields = { "#set-system": "system", "#set-max-tokens": "maxTokens", "#set-extra": "extra" };
  for (const [selector, name] of Object.entries(fields)) {
    $(selector).value = s[name];
    $(selector).addEventListener("input", (e) => {
      s[name] = e.target.value;
      saveSettings();
    });
  }
  const temperature = $("#set-temperature");
  temperature.value = s.temperature;
  $("#temperature-value").textContent = Number(s.temperature).toFixed(2);
  temperature.addEventListener("input", () => {
    s.temperature = Number(temperature.value);
    $("#temperature-value").textContent = s.temperature.toFixed(2);
    saveSettings();
  });
  $("#set-extra").addEventListener("input", () => {
    $("#extra-error").hidden = !s.extra.trim() || Object.keys(extraParams()).length > 0 || s.extra.trim() === "{}";
  });
  $("#set-key").value = state.apiKey;
  $("#set-key").addEventListener("change", (e) => useKey(e.target.value));
  $("#forget-key").addEventListener("click", () => {
    localStorage.removeItem(STORE.key);
    state.apiKey = "";
    $("#set-key").value = "";
    checkAccess();
    toast("The key is forgotten.");
  });
  $("#clear-history").addEventListener("click", () => {
    newChat();
    dialog.close();
  });
  $("#open-settings").addEventListener("click", () => dialog.showModal());
  dialog.addEventListener("click", (e) => e.target === dialog && dialog.close());
}

function newChat() {
  if (state.streams.size) return;
  state.messages = [];
  state.views.clear();
  saveNow();
  renderAll();
  $("#prompt").focus();
}

function wireKeyPanel() {
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await useKey($("#key-input").value)) {
      $("#key-input").value = "";
      $("#prompt").focus();
    }
  });
}

function wireGlobal() {
  $("#new-chat").addEventListener("click", newChat);
  $("#jump").addEventListener("click", () => scrollToBottom(true));
  $("#scroller").addEventListener("scroll", () => { $("#jump").hidden = nearBottom(); }, { passive: true });
  $("#messages").addEventListener("click", (e) => {
    const copy = e.target.closest("[data-copy]");
    if (copy) copyText(copy.closest("figure").querySelector("code").textContent);
  });
  const wake = () => {
    for (const stream of state.streams.values()) stream.nudge();
  };
  window.addEventListener("online", wake);
  document.addEventListener("visibilitychange", () => (document.hidden ? flushSave() : wake()));
  window.addEventListener("pagehide", flushSave);
  window.addEventListener("storage", (e) => {
    if (e.key !== STORE.chat || state.streams.size) return;  // another tab changed the conversation
    state.messages = loadJSON(STORE.chat, { messages: [] }).messages || [];
    state.views.clear();
    renderAll();
  });
}

// Answers that were running when the page went away: follow them again from where the
// saved text ends; one that already finished arrives whole in a few events.
function reattach() {
  for (const message of state.messages) {
    if (message.role === "assistant" && LIVE.has(message.status)) {
      message.timed = false;
      follow(message);
    }
  }
}

async function main() {
  wireComposer();
  wireDrop();
  wireSettings();
  wireKeyPanel();
  wireGlobal();
  renderAll();
  scrollToBottom();
  updateComposer();
  checkHealth();
  await checkAccess();
  reattach();
  document.documentElement.dataset.ready = "true";
}

main();
