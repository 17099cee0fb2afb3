// The market view: agents, tasks by state and a throughput chart, pushed live by the
// gateway (Server-Sent Events on /api/market/events).

import { t, lang, onLanguage } from "./i18n.js";
import { creditsText } from "./credits.js";

const $ = (id) => document.getElementById(id);
const GROUPS = ["waiting", "running", "done", "failed", "aborted"];
let last = null;
let online = false;
const subscribers = [];

export function onSnapshot(fn) { subscribers.push(fn); }

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const fmt = (n, digits = 1) =>
  new Intl.NumberFormat(lang(), { maximumFractionDigits: digits }).format(n || 0);
const short = (id) => (id ? String(id).slice(0, 8) : "?");

function label(prefix, value) {
  if (!value) return "";
  const key = `${prefix}.${value}`;
  const s = t(key);
  return s === key ? value : s;
}

// ------------------------------------------------------------------ agents
function renderAgents(agents) {
  const body = $("agents").querySelector("tbody");
  body.replaceChildren();
  if (!agents.length) {
    body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, t("noAgents"))));
    return;
  }
  for (const a of agents) {
    let state = label("state", a.state);
    if (a.type === "broker" && a.leader !== null) state += ` (${t(a.leader ? "leader" : "standby")})`;
    const name = el("td", { class: "name" }, a.name);
    if (a.self) name.append(el("span", { class: "muted" }, ` — ${t("you.agent")}`));
    if (a.key) name.append(" ", keyChip(a.key));
    const models = el("td", { class: "models" });
    for (const m of a.models) models.append(el("span", { class: "chip", title: m.contextLength ? `ctx ${m.contextLength}` : null }, m.name));
    const slots = a.type === "worker" && a.slots !== null ? `${fmt(a.running ?? 0, 0)} / ${fmt(a.slots, 0)}` : "";
    const speed = a.speed ? `${fmt(a.speed)} tok/s` : "";
    body.append(el("tr", { dataset: { type: a.type || "", name: a.name, key: a.key || "" } },
      el("td", {}, el("span", { class: `badge type-${a.type}` }, label("type", a.type))),
      name,
      el("td", {}, el("span", { class: `state state-${a.state}` }, state)),
      models,
      el("td", { class: "num slots" }, slots),
      el("td", { class: "num" }, speed),
      el("td", {}, a.engine || "")));
  }
}

// An agent's key (its identity id): the first characters, the whole on hover.
function keyChip(key) {
  return el("code", { class: "key", title: `${t("key")}: ${key}` }, short(key));
}

// ------------------------------------------------------------------ tasks
function taskCard(task) {
  const head = el("div", { class: "task-head" },
    el("code", { title: task.id }, short(task.id)),
    task.model ? el("span", { class: "chip" }, task.model) : null,
    ...(task.needs || []).map((need) => el("span", { class: "chip chip-need" }, need)));
  const lines = el("dl", { class: "task-lines" });
  const line = (k, v) => { if (v) lines.append(el("div", {}, el("dt", {}, t(k)), el("dd", {}, v))); };
  line("task.asker", task.askerName || short(task.asker));
  if (task.worker) {
    const who = el("span", {}, task.workerName || short(task.worker));
    if (task.workerKey) who.append(" ", keyChip(task.workerKey));
    line("task.worker", who);
  }
  const extra = [];
  if (task.state === "todo" || task.state === "prepared") extra.push(t(`task.state.${task.state}`));
  if (task.attempts > 1) extra.push(t("task.attempt", { n: task.attempts }));
  if (task.tokens) extra.push(t("task.tokens", { n: task.tokens }));
  if (Number.isInteger(task.cost)) extra.push(t("task.cost", { credits: creditsText(task.cost) }));
  if (task.duration) extra.push(`${fmt(task.duration / 1000)} s`);
  if (task.abortAsked && !["aborted", "done", "failed"].includes(task.state)) extra.push(t("task.abortAsked"));
  const card = el("li", { class: `task task-${task.state}`, dataset: { id: task.id, state: task.state, ...(task.workerKey ? { workerKey: task.workerKey } : {}), ...(Number.isInteger(task.cost) ? { cost: String(task.cost) } : {}) } },
    head, lines, extra.length ? el("p", { class: "task-extra" }, extra.join(" · ")) : null);
  if (task.error) card.append(el("p", { class: "task-error" }, task.error));
  return card;
}

function renderBoard(tasks, counts) {
  const board = $("board");
  board.replaceChildren();
  for (const g of GROUPS) {
    const list = el("ul", { class: "tasks" });
    for (const task of (tasks[g] || []).slice(0, 30)) list.append(taskCard(task));
    if (!list.children.length) list.append(el("li", { class: "muted none" }, t("noTasks")));
    const id = `group-${g}`;
    board.append(el("section", { class: `column column-${g}`, "aria-labelledby": id, dataset: { group: g } },
      el("h3", { id }, `${t(`group.${g}`)} `, el("span", { class: "count" }, String(counts[g] || 0))),
      list));
  }
}

// ------------------------------------------------------------------ chart
function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

function drawChart(th) {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 520;
  const h = canvas.clientHeight || 150;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const series = th.series || [];
  const pad = { l: 34, r: 34, t: 8, b: 18 };
  const iw = w - pad.l - pad.r;
  const ih = h - pad.t - pad.b;
  const maxTasks = Math.max(1, ...series.map((p) => p.tasksPerMin));
  const maxTok = Math.max(1, ...series.map((p) => p.tokensPerSec));
  ctx.strokeStyle = css("--line");
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t + ih + 0.5);
  ctx.lineTo(pad.l + iw, pad.t + ih + 0.5);
  ctx.stroke();
  const n = series.length || 1;
  const bw = iw / n;
  ctx.fillStyle = css("--tasks");
  series.forEach((p, i) => {
    const bh = (p.tasksPerMin / maxTasks) * ih;
    if (bh > 0) ctx.fillRect(pad.l + i * bw + 1, pad.t + ih - bh, Math.max(1, bw - 2), bh);
  });
  ctx.strokeStyle = css("--tokens");
  ctx.lineWidth = 2;
  ctx.beginPath();
  series.forEach((p, i) => {
    const x = pad.l + i * bw + bw / 2;
    const y = pad.t + ih - (p.tokensPerSec / maxTok) * ih;
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css("--accent");
  ctx.textAlign = "right";
  ctx.fillText(fmt(maxTasks, 0), pad.l - 4, pad.t + 10);
  ctx.fillStyle = css("--tokens");
  ctx.textAlign = "left";
  ctx.fillText(fmt(maxTok, 0), pad.l + iw + 4, pad.t + 10);
  ctx.fillStyle = css("--muted");
  ctx.fillText(`−${Math.round((n * (th.bucket || 10)) / 60)} min`, pad.l, h - 4);
  ctx.textAlign = "right";
  ctx.fillText("0", pad.l + iw, h - 4);
}

// ------------------------------------------------------------------ status
function renderStatus() {
  const s = $("market-status");
  if (!online || !last) { s.textContent = last && !online ? t("market.offline") : t("market.connecting"); s.dataset.online = "false"; return; }
  const time = new Date(last.time).toLocaleTimeString(lang());
  s.textContent = t("market.live", { room: last.room, time });
  s.dataset.online = "true";
}

function render() {
  renderStatus();
  if (!last) return;
  renderAgents(last.agents);
  renderBoard(last.tasks, last.counts);
  $("tasks-per-min").textContent = fmt(last.throughput.tasksPerMin);
  $("tokens-per-sec").textContent = fmt(last.throughput.tokensPerSec);
  if (!$("view-market").hidden) drawChart(last.throughput);
}

export function redraw() { if (last) drawChart(last.throughput); }

let source = null;

/** Follow the market (one Server-Sent Events connection) while the view is shown; a
 * browser allows few connections per host, so hidden views and tabs hold none. */
export function followMarket(on) {
  if (on && !source) {
    online = false;
    renderStatus();
    source = new EventSource("/api/market/events");
    source.addEventListener("market", (e) => {
      try { last = JSON.parse(e.data); } catch { return; }
      online = true;
      render();
      for (const fn of subscribers) fn(last);
    });
    source.addEventListener("open", () => { online = true; renderStatus(); });
    source.addEventListener("error", () => { online = false; renderStatus(); });
  } else if (!on && source) {
    source.close();
    source = null;
  }
}

export function initMarket() {
  renderStatus();
  onLanguage(render);
  window.addEventListener("resize", redraw);
}
