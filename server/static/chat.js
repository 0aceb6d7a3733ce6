// Athena's chat page: talks to /v1/chat/completions with streaming (fetch + server-sent events).
// The conversation lives in `history` (this tab only); Stop aborts the request, which the server
// sees as a disconnect and cancels the generation.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // {role, content} of finished turns
let model = null;
let controller = null;       // AbortController of the request in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      $("model").textContent = "";
      setStatus(r.status === 401 ? "This server needs an API key: enter it in the settings." : await errorText(r));
      return false;
    }
    const body = await r.json();
    model = body.data[0].id;
    $("model").textContent = model;
    setStatus("");
    return true;
  } catch (e) {
    setStatus("Cannot reach the server: " + e.message);
    return false;
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { model: model, messages: messages, stream: true };
  const temperature = $("temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads an SSE body: events are separated by a blank line; each "data: " line is one JSON chunk
// or [DONE]. Calls onData(parsed) per chunk; returns when the stream ends.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}

async function send(text) {
  if (!model && !(await loadModel())) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  let reply = "";
  controller = new AbortController();
  busy(true);
  setStatus("generating…");
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    let finish = null;
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    history.push({ role: "assistant", content: reply });
    setStatus(finish === "length" ? "stopped at the max tokens limit" : "");
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "(stopped)";
      bubble.appendChild(note);
      setStatus("stopped");
    } else {
      history.pop();   // the user turn got no answer: leave it out of the next request
      bubble.remove();
      addMessage("error", e.message);
      setStatus("error");
    }
  } finally {
    controller = null;
    busy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").textContent = "";
  setStatus("");
});
$("api-key").value = localStorage.getItem("athena-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("athena-api-key", $("api-key").value.trim());
  loadModel();
});
loadModel();
