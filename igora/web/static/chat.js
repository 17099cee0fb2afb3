// The chat: talks to the gateway's OpenAI API (POST /v1/chat/completions, stream: true).

import { t, lang, onLanguage } from "./i18n.js";
import { PRESETS, presetText, presetOf } from "./presets.js";
import { balanceAfterAnswer, creditsText, initBalance, refreshBalance } from "./credits.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "igora.chat";
const KEY_KEY = "igora.apiKey";

/** Headers for the gateway's /v1 API (with the API key, when one was given). */
function apiHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

const history = [];          // [{role, content}] sent with each request (system prompt apart)
let controller = null;       // AbortController of the answer being streamed
let knownModels = [];

// ------------------------------------------------------------------ settings
function saveSettings() {
  const s = {
    model: $("model").value, preset: $("preset").value, system: $("system").value,
    temperature: $("temperature").value, seed: $("seed").value, maxTokens: $("max-tokens").value,
    format: $("format").value, tools: $("tools").value, toolChoice: $("tool-choice").value,
  };
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(s));
  if ($("api-key").value.trim()) sessionStorage.setItem(KEY_KEY, $("api-key").value.trim());
  else sessionStorage.removeItem(KEY_KEY);
}

function loadSettings() {
  let s = {};
  try { s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {}; } catch { s = {}; }
  fillPresets();
  if (typeof s.system === "string") {
    $("system").value = s.system;
    $("preset").value = presetOf(s.system)?.id || "custom";
  } else {
    $("preset").value = "assistant";
    $("system").value = presetText("assistant", lang());
  }
  $("api-key").value = sessionStorage.getItem(KEY_KEY) || "";
  if (s.temperature) $("temperature").value = s.temperature;
  if (s.format === "json_object") $("format").value = s.format;
  if (typeof s.tools === "string") $("tools").value = s.tools;
  if ([...$("tool-choice").options].some((o) => o.value === s.toolChoice)) {
    $("tool-choice").value = s.toolChoice;
  }
  if (s.seed !== undefined) $("seed").value = s.seed;
  if (s.maxTokens) $("max-tokens").value = s.maxTokens;
  $("temperature-value").textContent = $("temperature").value;
  return s;
}

function fillPresets() {
  const sel = $("preset");
  const value = sel.value;
  sel.replaceChildren();
  for (const p of [{ id: "custom" }, ...PRESETS]) {
    const o = document.createElement("option");
    o.value = p.id;
    o.textContent = t(`preset.${p.id}`);
    sel.append(o);
  }
  if (value) sel.value = value;
}

// ------------------------------------------------------------------ models
export async function refreshModels(preferred) {
  let ids = knownModels;
  try {
    const r = await fetch("/v1/models", { headers: apiHeaders() });
    if (r.ok) ids = ((await r.json()).data || []).map((m) => m.id).filter(Boolean).sort();
    else if (r.status === 401) {
      $("model-hint").textContent = t("err.auth");
      return;
    }
  } catch { /* keep the last list; the market view says when the gateway is gone */ }
  if (ids.join("\n") === knownModels.join("\n") && $("model").options.length) return;
  knownModels = ids;
  renderModels(preferred);
}

function renderModels(preferred) {
  const sel = $("model");
  const want = preferred || sel.value;
  sel.replaceChildren();
  if (!knownModels.length) {
    const o = document.createElement("option");
    o.value = "";
    o.textContent = t("model.none");
    sel.append(o);
  }
  for (const id of knownModels) {
    const o = document.createElement("option");
    o.value = id;
    o.textContent = id;
    sel.append(o);
  }
  if (want && knownModels.includes(want)) sel.value = want;
  $("model-hint").textContent = knownModels.length
    ? t("model.hint.count", { n: knownModels.length }) : t("model.hint.none");
}

// ------------------------------------------------------------------ messages
function addMessage(role, text) {
  $("empty").hidden = true;
  const box = document.createElement("article");
  box.className = `msg msg-${role}`;
  const who = document.createElement("h3");
  who.className = "who";
  who.dataset.role = role;
  who.textContent = t(role === "user" ? "you" : "assistant");
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  box.append(who, body);
  $("log").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function note(box, kind, text) {
  const p = document.createElement("p");
  p.className = `note note-${kind}`;
  if (kind === "error") p.setAttribute("role", "alert");
  p.textContent = text;
  box.append(p);
  box.scrollIntoView({ block: "end" });
}

/** A readable, translated sentence for an OpenAI-style error (status + error body, as
 * the gateway sends them: see igora/gateway/errors.py). */
export function describeError(status, err) {
  const code = String(err?.code || "");
  const type = String(err?.type || "");
  const msg = String(err?.message || "").trim() || `HTTP ${status}`;
  if (code === "model_not_found" || (status === 404 && !code)) return t("err.unknown_model");
  if (code === "no_worker") return t("err.no_worker");
  if (code === "market_unreachable") return t("err.market");
  if (status === 504 || type === "timeout" || code === "task_timeout") return t("err.timeout");
  if (code === "task_aborted") return t("err.aborted");
  if (status === 401) return t("err.auth");
  if (status === 503) return t("err.no_worker");
  if (status === 400 || status === 413 || status === 422 || type === "invalid_request_error") {
    return t("err.bad_request", { msg });
  }
  return t("err.failed", { msg });
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("log").setAttribute("aria-busy", String(busy));
}

// ------------------------------------------------------------------ sending
function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    messages, stream: true, temperature: Number($("temperature").value),
    stream_options: { include_usage: true },  // the last chunk: usage and the price
  };
  if ($("model").value) body.model = $("model").value;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const max = $("max-tokens").value.trim();
  if (max !== "") body.max_tokens = Number(max);
  if ($("format").value === "json_object") body.response_format = { type: "json_object" };
  const tools = parseTools();
  if (tools.length) {
    body.tools = tools;
    // auto: the model answers text or calls one; required: it calls one; none: text only.
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

// The tools typed in the settings: a JSON list of OpenAI tools (empty: none).
function parseTools() {
  const text = $("tools").value.trim();
  if (!text) return [];
  const tools = JSON.parse(text);
  if (!Array.isArray(tools)) throw new SyntaxError("not a list");
  return tools;
}

// ------------------------------------------------------------------ structured answers
// A JSON answer is shown indented; a tool call as its function name and its arguments,
// indented. The text itself stays as it came (copying it gives what the model wrote).
function pretty(text) {
  const trimmed = text.trim();
  if (!/^[[{]/.test(trimmed)) return null;
  try { return JSON.stringify(JSON.parse(trimmed), null, 2); } catch { return null; }
}

function showJson(body, text) {
  const json = pretty(text);
  if (json === null) return;
  const pre = document.createElement("pre");
  pre.className = "json";
  pre.setAttribute("aria-label", t("json"));
  pre.textContent = json;
  body.replaceChildren(pre);
}

function showToolCalls(box, calls) {
  for (const call of calls) {
    const block = document.createElement("section");
    block.className = "tool-call";
    const title = document.createElement("h4");
    title.textContent = `${t("toolCall")}: `;
    const name = document.createElement("code");
    name.textContent = call.name;
    title.append(name);
    const args = document.createElement("pre");
    args.className = "json";
    args.textContent = pretty(call.arguments) ?? call.arguments;
    block.append(title, args);
    box.querySelector(".body").after(block);
  }
}

async function send() {
  if (controller) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    $("prompt").focus();
    return;
  }
  try {
    parseTools();
  } catch (e) {
    $("tools-more").open = true;
    $("tools").setCustomValidity(t("err.tools", { msg: e.message }));
    $("tools").reportValidity();
    return;
  }
  $("tools").setCustomValidity("");
  $("prompt").value = "";
  saveSettings();
  history.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const box = addMessage("assistant", "");
  const body = box.querySelector(".body");
  box.classList.add("streaming");
  body.dataset.placeholder = t("waiting");
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  let finish = null;
  let error = null;
  let usage = null;  // the last chunk's usage, and the price its receipt signed
  let price = null;
  const calls = [];  // tool calls of the answer, put together from their streamed pieces
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    const taskId = r.headers.get("x-igora-task");
    if (taskId) box.dataset.task = taskId;
    if (!r.ok) {
      let err = null;
      try { err = (await r.json()).error; } catch { /* not JSON */ }
      error = describeError(r.status, err);
    } else {
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      reading: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") break reading;
          let chunk;
          try { chunk = JSON.parse(data); } catch { continue; }
          if (chunk.error) { error = describeError(0, chunk.error); break reading; }
          if (chunk.usage) usage = chunk.usage;
          if (Number.isInteger(chunk.igora?.price)) price = chunk.igora.price;
          const choice = chunk.choices?.[0];
          if (chunk.igora?.restart) {  // the worker was lost: the answer starts again elsewhere
            answer = "";
            body.textContent = "";
            note(box, "info", t("restarted"));
            continue;
          }
          for (const part of choice?.delta?.tool_calls || []) {
            const call = calls[part.index] ??= { name: "", arguments: "" };
            call.name += part.function?.name || "";
            call.arguments += part.function?.arguments || "";
          }
          const piece = choice?.delta?.content;
          if (piece) {
            answer += piece;
            body.textContent = answer;
            box.scrollIntoView({ block: "end" });
          }
          if (choice?.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else error = t("err.network");
  } finally {
    controller = null;
    setBusy(false);
    box.classList.remove("streaming");
    delete body.dataset.placeholder;
  }
  box.dataset.finish = error ? "error" : (finish || "stop");
  if (answer) showJson(body, answer);
  if (calls.length) showToolCalls(box, calls);
  if (answer) history.push({ role: "assistant", content: answer });
  else history.pop();  // no answer: the next request must not carry an unanswered turn
  if (error) note(box, "error", error);
  else if (finish === "stopped") note(box, "info", t("stopped"));
  else if (finish === "length") note(box, "info", t("finish.length"));
  if (price !== null && !error) showCost(box, price, usage);
  balanceAfterAnswer();
  if (!answer && !calls.length && !error && finish !== "stopped") box.remove();
  $("prompt").focus();
}

// What the answer cost: the price the client's receipt signed (what the market settles).
function showCost(box, price, usage) {
  const vars = {
    credits: creditsText(price),
    prompt: usage?.prompt_tokens ?? "?",
    completion: usage?.completion_tokens ?? "?",
  };
  note(box, "cost", t("cost", vars));
  const p = box.querySelector(".note-cost");
  p.dataset.millicredits = String(price);
  p.dataset.vars = JSON.stringify(vars);
}

function stop() {
  if (controller) controller.abort();
}

function newChat() {
  stop();
  history.length = 0;
  for (const m of $("log").querySelectorAll(".msg")) m.remove();
  $("empty").hidden = false;
  $("prompt").focus();
}

// ------------------------------------------------------------------ wiring
export function initChat() {
  const saved = loadSettings();
  initBalance(() => apiHeaders());
  renderModels(saved.model);
  refreshModels(saved.model);
  setInterval(() => { if (!controller) refreshModels(); }, 10000);

  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) stop(); });
  $("new-chat").addEventListener("click", newChat);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = $("temperature").value;
  });
  $("preset").addEventListener("change", () => {
    const text = presetText($("preset").value, lang());
    if (text !== null) $("system").value = text;
    saveSettings();
  });
  $("system").addEventListener("input", () => {
    $("preset").value = presetOf($("system").value)?.id || "custom";
  });
  $("settings").addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => { refreshModels(); refreshBalance(); });
  $("tools").addEventListener("input", () => $("tools").setCustomValidity(""));
  $("settings").addEventListener("submit", (e) => e.preventDefault());

  onLanguage((code) => {
    fillPresets();
    // A preset's text follows the language; a text of one's own is left alone.
    const p = presetOf($("system").value);
    if (p && p.lang !== code) $("system").value = presetText(p.id, code);
    renderModels();
    for (const who of document.querySelectorAll(".msg .who")) {
      who.textContent = t(who.dataset.role === "user" ? "you" : "assistant");
    }
    for (const p of document.querySelectorAll(".msg .note-cost")) {
      const vars = JSON.parse(p.dataset.vars);
      p.textContent = t("cost", { ...vars, credits: creditsText(Number(p.dataset.millicredits)) });
    }
  });
}

export function modelsFromMarket(models) {
  // The market view sees workers come and go before the next poll: refresh at once.
  const ids = [...new Set(models)].sort();
  if (ids.join("\n") !== knownModels.join("\n") && !controller) refreshModels();
}
