// localllm's chat page: streams /v1/chat/completions and renders the reply as markdown.
// Model output is untrusted: markdown becomes DOM nodes built with createElement and
// text nodes, so nothing the model writes is ever parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, model: null, key: sessionStorage.getItem("localllm-key") || "" };

// ------------------------------------------------------------------ markdown -> DOM

const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|\[([^\]]+)\]\(([^)\s]+)\)/g;

function safeUrl(raw) {
  try {
    const url = new URL(raw, window.location.href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    let node;
    if (m[1] !== undefined) {
      node = document.createElement("code");
      node.textContent = m[2];
    } else if (m[3] !== undefined || m[4] !== undefined) {
      node = document.createElement("strong");
      renderInline(m[3] ?? m[4], node);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      node = document.createElement("em");
      renderInline(m[5] ?? m[6], node);
    } else {
      const href = safeUrl(m[8]);
      if (href === null) {
        node = document.createTextNode(m[0]);
      } else {
        node = document.createElement("a");
        node.href = href;
        node.rel = "noopener noreferrer nofollow";
        node.target = "_blank";
        renderInline(m[7], node);
      }
    }
    parent.append(node);
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split(/\r?\n/);
  let para = null;
  let list = null;
  const endBlocks = () => { para = null; list = null; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      endBlocks();
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[2]) code.dataset.lang = fence[2];
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      code.textContent = body.join("\n");
      pre.append(code);
      root.append(pre);
      continue;
    }
    if (!line.trim()) { endBlocks(); continue; }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      endBlocks();
      const h = document.createElement(`h${Math.min(heading[1].length + 1, 6)}`);
      renderInline(heading[2], h);
      root.append(h);
      continue;
    }
    const item = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/);
    if (item) {
      const tag = item[1] ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        para = null;
        list = document.createElement(tag);
        if (item[2] && item[2] !== "1") list.start = Number(item[2]);
        root.append(list);
      }
      const li = document.createElement("li");
      renderInline(item[3], li);
      list.append(li);
      continue;
    }
    const quote = line.match(/^>\s?(.*)$/);
    if (quote) {
      endBlocks();
      const bq = document.createElement("blockquote");
      renderInline(quote[1], bq);
      root.append(bq);
      continue;
    }
    if (para) {
      para.append(document.createElement("br"));
    } else {
      list = null;
      para = document.createElement("p");
      root.append(para);
    }
    renderInline(line, para);
  }
  return root;
}
window.localllmRenderMarkdown = renderMarkdown;

// ------------------------------------------------------------------ page

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (role === "assistant") div.append(renderMarkdown(text));
  else div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// A tool call the model made, shown as its name and pretty-printed arguments (the page
// never runs tools; the client that offered them does).
function renderToolCalls(calls) {
  const root = document.createDocumentFragment();
  for (const call of calls) {
    const box = document.createElement("div");
    box.className = "tool-call";
    const title = document.createElement("div");
    title.className = "tool-name";
    title.textContent = `tool call · ${call.function.name}`;
    const args = document.createElement("pre");
    let text = call.function.arguments;
    try { text = JSON.stringify(JSON.parse(text), null, 2); } catch { /* still arriving */ }
    args.textContent = text;
    box.append(title, args);
    root.append(box);
  }
  return root;
}
window.localllmRenderToolCalls = renderToolCalls;

function tools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const value = JSON.parse(text);  // a SyntaxError is shown as the reply's error
  return Array.isArray(value) ? value : [value];
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.append(span);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error?.message || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

function needKey(message) {
  $("key-row").hidden = false;
  $("settings").open = true;
  $("status").textContent = message;
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.status === 401) {
    needKey("This server needs an API key: enter it in Settings.");
    document.body.dataset.state = "idle";
    return;
  }
  if (!resp.ok) {
    $("model").textContent = await errorText(resp);
    return;
  }
  const card = (await resp.json()).data[0];
  state.model = card.id;
  const m = card.meta || {};
  $("model").textContent = `${card.id} · ${m.n_parallel} slot(s) of ${m.n_ctx_slot} tokens`;
  document.body.dataset.state = "idle";
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const temperature = Number.parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  const offered = tools();
  if (offered) body.tools = offered;
  return body;
}

// Reads the SSE stream; calls onEvent with each parsed `data:` payload.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  let reply = "";
  const calls = [];
  let finish = null;
  let usage = null;
  let timings = null;
  let frame = 0;
  const redraw = () => {
    if (frame) cancelAnimationFrame(frame);
    frame = 0;
    div.replaceChildren(renderMarkdown(reply), renderToolCalls(calls));
    div.scrollIntoView({ block: "end" });
  };
  state.controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!resp.ok) {
      const message = await errorText(resp);
      if (resp.status === 401) needKey(message);
      throw new Error(message);
    }
    await readEvents(resp, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) return;
      if (choice.delta?.content) {
        reply += choice.delta.content;
        if (!frame) frame = requestAnimationFrame(redraw);
      }
      for (const part of choice.delta?.tool_calls || []) {
        const call = calls[part.index] ||= { id: "", type: "function", function: { name: "", arguments: "" } };
        call.id += part.id || "";
        call.function.name += part.function?.name || "";
        call.function.arguments += part.function?.arguments || "";
        if (!frame) frame = requestAnimationFrame(redraw);
      }
      if (choice.finish_reason) { finish = choice.finish_reason; timings = event.timings || null; }
    });
    redraw();
    const parts = [];
    if (finish === "length") parts.push("cut at max tokens");
    if (finish === "tool_calls") parts.push("tool calls (not run by this page)");
    if (usage) parts.push(`${usage.prompt_tokens} in · ${usage.completion_tokens} out`);
    if (timings) parts.push(`${timings.predicted_per_second.toFixed(1)} tok/s`);
    $("status").textContent = parts.join(" · ");
  } catch (err) {
    redraw();
    if (err.name === "AbortError") {
      note(div, "[stopped]");
      $("status").textContent = "stopped";
    } else {
      div.classList.add("error");
      note(div, err.message);
      $("status").textContent = "error";
    }
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "1";
    state.controller = null;
    setBusy(false);
    // What was shown stays in the conversation, as chat keeps a stopped reply.
    if (calls.length) state.history.push({ role: "assistant", content: reply || null, tool_calls: calls });
    else if (reply) state.history.push({ role: "assistant", content: reply });
    else state.history.pop();
  }
}

function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    $("messages").replaceChildren();
    $("status").textContent = "";
  });
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("localllm-key", state.key);
    loadModel();
  });
  setBusy(false);
  document.body.dataset.state = "loading";
  loadModel().catch((err) => { $("model").textContent = `cannot reach the server: ${err.message}`; });
}

init();
