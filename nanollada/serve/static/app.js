// nanollada serve's web page: one or two models side by side on the same prompt, answers streamed over the
// OpenAI-compatible API (server-sent events), and for diffusion models the denoising canvas animated from the
// server's "nanollada.canvas" frames (masks filling in, edits highlighted). Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const panes = ["a", "b"].map((k) => ({ key: k, el: $("pane-" + k), select: $("model-" + k), history: [],
                                       controller: null }));
let models = [];
let busy = false;

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.appendChild(o);
}

function info(id) { return models.find((m) => m.id === id); }

function status(text) { $("status").textContent = text; }

async function init() {
  try {
    const r = await fetch("/v1/models");
    models = (await r.json()).data;
  } catch (e) {
    status("could not list the models: " + e);
    return;
  }
  const q = new URLSearchParams(location.search);
  panes.forEach((p, i) => {
    if (i === 1) option(p.select, "", "— none —");
    for (const m of models) {
      const n = m.nanollada;
      option(p.select, m.id, `${m.id} (${n.paradigm}${n.chat ? ", chat" : ", pretrain"})`);
    }
    const wanted = q.get(i === 0 ? "left" : "right");
    p.select.value = wanted !== null && (wanted === "" || info(wanted)) ? wanted
      : (i === 0 ? models[0]?.id : models[1]?.id) ?? "";
    p.select.onchange = () => { p.history = []; p.el.querySelector(".log").innerHTML = ""; layout(); };
  });
  layout();
  status(`${models.length} model(s) served`);
}

function layout() {
  const two = panes[1].select.value !== "";
  panes[1].el.classList.toggle("hidden", !two);
  $("panes").classList.toggle("single", !two);
  for (const p of panes) {
    const m = info(p.select.value);
    const h = p.el.querySelector("h2");
    if (!m) { h.textContent = ""; continue; }
    const n = m.nanollada;
    const d = n.defaults;
    const how = n.canvas ? `${d.strategy}${d.use_prefix_cache ? " + prefix cache" : ""}, block ${d.block_length}, ` +
      `temperature ${d.temperature}${n.editing ? `, editing ${d.editing}` : ""}`
      : `temperature ${d.temperature}, top-p ${d.top_p}, repetition penalty ${d.repetition_penalty}`;
    h.innerHTML = "";
    h.append(m.id);
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = `${n.paradigm} · ${(n.parameters / 1e6).toFixed(2)}M · ${n.chat ? "chat" :
      "pretraining: plain continuation, no history"} · ${how}`;
    h.append(tag);
  }
}

function addMessage(p, role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const t = document.createElement("div");
  t.className = "text";
  t.textContent = text;
  el.appendChild(t);
  const log = p.el.querySelector(".log");
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody(m, text, history) {
  const n = m.nanollada;
  const body = { model: m.id, stream: true, stream_options: { include_usage: true } };
  const extra = {};
  const greedy = $("greedy").checked;
  if (n.chat) {
    const system = $("system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history,
                     { role: "user", content: text }];
  } else {
    body.prompt = text;
  }
  for (const [field, id] of [["max_tokens", "max-tokens"], ["seed", "seed"]]) {
    if (num(id) !== undefined) body[field] = num(id);
  }
  if (!greedy && num("temperature") !== undefined) body.temperature = num("temperature");
  if (!greedy && num("top-p") !== undefined) body.top_p = num("top-p");
  if (greedy) extra.greedy = true;
  if (n.canvas) {
    extra.canvas = $("animate").checked;
    if ($("strategy").value) extra.strategy = $("strategy").value;
    if (num("block-length") !== undefined) extra.block_length = num("block-length");
    if (num("threshold") !== undefined) extra.threshold = num("threshold");
    if (n.editing && $("editing").value) extra.editing = $("editing").value;  // block diffusion only
  }
  if (Object.keys(extra).length) body.nanollada = extra;
  return body;
}

async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

// ---------------------------------------------------------------- the denoising canvas
class Canvas {
  constructor(parent) {
    this.el = document.createElement("div");
    this.el.className = "canvas";
    this.label = document.createElement("span");
    this.label.className = "step";
    this.body = document.createElement("span");
    this.el.append(this.label, this.body);
    parent.prepend(this.el);
    this.frames = [];
    this.shown = 0;
    this.timer = null;
    this.finished = false;
    this.onIdle = null;
  }

  add(frame) {
    this.frames.push(frame);
    this.el.dataset.frames = this.frames.length;
    if (!this.timer) this.tick();
  }

  reset() {
    this.cells = [];
    this.body.innerHTML = "";
    this.edits = 0;
    this.maxMasked = 0;
  }

  draw(frame) {
    if (this.shown === 0 || !this.cells || this.cells.length !== frame.length) {
      this.reset();
      for (let i = 0; i < frame.length; i++) {
        const c = document.createElement("span");
        c.className = "cell mask";
        this.body.appendChild(c);
        this.cells.push(c);
      }
    }
    for (const c of this.body.querySelectorAll(".new, .edit")) c.classList.remove("new", "edit");
    for (const [pos, text, kind] of frame.changes) {
      const c = this.cells[pos];
      if (!c) continue;
      if (kind === "remask" || text === null) {
        c.className = "cell mask";
        c.textContent = "";
        continue;
      }
      const special = /^<.*>$/.test(text) && text.length > 2;
      c.className = "cell " + (kind === "edit" ? "edit" : "new") + (special ? " special" : "");
      c.textContent = special ? (text === "</s>" ? "∎" : text) : text.replace(/\n/g, "⏎\n");
      if (kind === "edit") this.edits += 1;
    }
    this.maxMasked = Math.max(this.maxMasked, frame.masked);
    this.label.textContent = `step ${frame.step} · ${frame.masked} masked` +
      (this.edits ? ` · ${this.edits} edit(s)` : "");
    Object.assign(this.el.dataset, { rendered: this.shown, maxMasked: this.maxMasked, edits: this.edits,
                                     masked: frame.masked });
  }

  tick() {
    if (this.shown < this.frames.length) {
      this.shown += 1;
      this.draw(this.frames[this.shown - 1]);
      this.timer = setTimeout(() => this.tick(), Math.max(0, num("frame-delay") ?? 60));
    } else {
      this.timer = null;
      if (this.finished && this.onIdle) this.onIdle();
    }
  }

  replay() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.shown = 0;
    this.tick();
  }
}

// ---------------------------------------------------------------- one answer
function statsLine(usage, s, finish) {
  if (!s) return "";
  const n = usage ? usage.completion_tokens : 0;
  const parts = [`${n} tokens`, `${s.tokens_per_second.toFixed(1)} tok/s`, `${s.forwards} forwards`,
                 `${s.tokens_per_forward.toFixed(2)} tokens/forward`, `${s.seconds.toFixed(2)} s`];
  if (s.edits !== undefined) parts.push(`${s.edits} edit(s) (${s.editing})`);
  if (s.queue_seconds > 0.05) parts.push(`queued ${s.queue_seconds.toFixed(2)} s`);
  if (finish === "length") parts.push("stopped at max tokens");
  return parts.join(" · ");
}

async function ask(p, text) {
  const m = info(p.select.value);
  addMessage(p, "user", text);
  const msg = addMessage(p, "assistant", "");
  msg.dataset.state = "streaming";
  const textEl = msg.querySelector(".text");
  const statsEl = document.createElement("div");
  statsEl.className = "stats";
  msg.appendChild(statsEl);
  const body = requestBody(m, text, p.history);
  const canvas = body.nanollada && body.nanollada.canvas ? new Canvas(msg) : null;
  if (canvas) textEl.hidden = true;  // the canvas shows the answer forming; the text follows once it has played
  let answer = "", usage = null, stats = null, finish = null;
  p.controller = new AbortController();
  try {
    const resp = await fetch(m.nanollada.chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: p.controller.signal });
    if (!resp.ok) {
      const j = await resp.json().catch(() => ({}));
      throw new Error((j.error && j.error.message) || `HTTP ${resp.status}`);
    }
    await readEvents(resp, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.object === "nanollada.canvas") {
        if (canvas) canvas.add(ev);
        return;
      }
      if (ev.usage) usage = ev.usage;
      const c = ev.choices && ev.choices[0];
      if (!c) return;
      const delta = m.nanollada.chat ? (c.delta && c.delta.content) : c.text;
      if (delta) {
        answer += delta;
        textEl.textContent = answer;
        const log = p.el.querySelector(".log");
        log.scrollTop = log.scrollHeight;
      }
      if (c.finish_reason) finish = c.finish_reason;
      if (ev.nanollada) stats = ev.nanollada;
    });
    statsEl.textContent = statsLine(usage, stats, finish);
    if (m.nanollada.chat) p.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    if (!answer) textEl.textContent = "(empty answer: the model ended at once)";
    msg.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      statsEl.textContent = "stopped";
      msg.dataset.state = "stopped";
      if (m.nanollada.chat && answer) p.history.push({ role: "user", content: text },
                                                     { role: "assistant", content: answer });
    } else {
      msg.classList.add("error");
      textEl.textContent = "error: " + e.message;
      msg.dataset.state = "error";
    }
  } finally {
    p.controller = null;
  }
  if (canvas) {
    canvas.finished = true;
    const controls = document.createElement("span");
    controls.className = "controls";
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "replay denoising";
    b.onclick = () => canvas.replay();
    controls.appendChild(b);
    canvas.el.appendChild(controls);
    await new Promise((resolve) => { canvas.onIdle = resolve; if (!canvas.timer) resolve(); });
    canvas.el.dataset.played = "1";
    textEl.hidden = false;
  }
  msg.dataset.complete = "1";
}

function setBusy(b) {
  busy = b;
  $("send").disabled = b;
  $("stop").disabled = !b;
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || busy) return;
  $("prompt").value = "";
  setBusy(true);
  const active = panes.filter((p) => p.select.value);
  status(`asking ${active.map((p) => p.select.value).join(" and ")}…`);
  await Promise.all(active.map((p) => ask(p, text)));
  setBusy(false);
  status("ready");
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => panes.forEach((p) => p.controller && p.controller.abort()));
$("reset").addEventListener("click", () => {
  for (const p of panes) { p.history = []; p.el.querySelector(".log").innerHTML = ""; }
  status("conversations cleared");
});
init();
