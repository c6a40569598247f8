// nanoseek chat page: streams POST /v1/chat/completions with fetch + SSE parsing; the chain of
// thought (delta.reasoning_content) goes into a collapsible <details> panel, the answer below it.
// The conversation lives in this page only; Stop aborts the request (the server frees its slot).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}], earlier reasoning is not sent back (R1 convention)
let modelId = null;
let controller = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;    // never innerHTML: model output is untrusted
  return e;
}

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (res.status === 401) { $("model").textContent = "API key needed (Settings)"; return; }
    const body = await res.json();
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

function assistantBubble() {
  const div = el("div", "msg assistant");
  const details = el("details", "reasoning");
  const summary = el("summary", null, "Thinking…");
  const thought = el("div", "thought");
  details.append(summary, thought);
  details.hidden = true;
  const answer = el("div", "answer");
  const stats = el("div", "stats");
  div.append(details, answer, stats);
  $("log").append(div);
  return { div, details, summary, thought, answer, stats };
}

// Server-sent events from a fetch body: blocks separated by a blank line, "data:" lines joined.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r?\n\r?\n/.exec(buf))) {
      const block = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody() {
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    stream: true, stream_options: { include_usage: true },
    temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"),
    reasoning_budget: num("budget"),
  };
  if (modelId) body.model = modelId;
  return body;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("input").disabled = on;
}

async function send(text) {
  history.push({ role: "user", content: text });
  $("log").append(el("div", "msg user", text));
  const b = assistantBubble();
  scrollDown();
  controller = new AbortController();
  busy(true);
  let reasoning = "", content = "", usage = null, note = "", failed = null;
  const t0 = performance.now();
  let tThink = null, frame = 0;
  // Paint at most once per frame: a fast model sends hundreds of deltas a second, and re-rendering the
  // whole text plus a forced layout for each one starves the page (the Stop button stops responding).
  const paint = () => {
    frame = 0;
    if (reasoning) {
      b.details.hidden = false;
      if (!content) b.details.open = true;
      b.thought.textContent = reasoning;
    }
    if (content) b.answer.textContent = content;
    scrollDown();
  };
  const schedule = () => { if (!frame) frame = requestAnimationFrame(paint); };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || res.status + " " + res.statusText);
    }
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      const r = delta.reasoning_content || delta.reasoning;
      if (r) reasoning += r;
      if (delta.content) {
        if (!content && reasoning) {
          tThink = (performance.now() - t0) / 1000;
          b.summary.textContent = `Thought for ${tThink.toFixed(1)} s`;
          b.details.open = false;
        }
        content += delta.content;
      }
      if (choice.finish_reason === "length") note = " · stopped at max tokens";
      schedule();
    }
  } catch (e) {
    if (e.name === "AbortError") note = " · stopped";
    else { failed = e.message; b.div.classList.add("error"); }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    paint();
    if (failed) b.answer.textContent = (content ? content + "\n\n" : "") + "Error: " + failed;
    if (reasoning && tThink === null) b.summary.textContent = "Reasoning";
    const secs = (performance.now() - t0) / 1000;
    if (usage) {
      const r = (usage.completion_tokens_details || {}).reasoning_tokens || 0;
      b.stats.textContent = `${usage.completion_tokens} tokens (${r} reasoning) · ` +
        `${(usage.completion_tokens / secs).toFixed(1)} tok/s${note}`;
    } else {
      b.stats.textContent = `${secs.toFixed(1)} s${note}`;
    }
    // A failed or empty turn is not history: resending it would show the model an empty reply.
    if (b.div.isConnected) {                 // not cleared meanwhile
      if (failed || !content) { history.pop(); b.div.previousElementSibling.classList.add("unsent"); }
      else history.push({ role: "assistant", content });
    }
    controller = null;
    busy(false);
    $("input").focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
});
$("api_key").addEventListener("change", loadModel);
loadModel();
