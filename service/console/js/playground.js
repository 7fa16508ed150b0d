// Playground: one prompt, answered side by side by the base and up to four adapters or weighted
// compositions, each a streamed POST /generate with per-token log-probabilities (shown on hover or
// keyboard focus). All columns are sent at once, so the server batches them together.

import { ApiError, events, getJSON, request } from "./api.js";
import { h, replace } from "./dom.js";

const MAX_EXTRA = 4;
const TOP_K = 5;

// "pirate:0.6, poet@3f2a9c1e:0.4" -> [{name, weight}]; throws with a message naming the bad part.
export function parseComposition(text) {
  const parts = text.split(",").map((s) => s.trim()).filter(Boolean);
  if (!parts.length) throw new Error("write name:weight pairs, e.g. pirate:0.6, poet:0.4");
  return parts.map((part) => {
    const i = part.lastIndexOf(":");
    const name = i > 0 ? part.slice(0, i).trim() : "";
    const weight = i > 0 ? Number(part.slice(i + 1)) : NaN;
    if (!name || !Number.isFinite(weight)) throw new Error(`'${part}' is not name:weight`);
    return { name, weight };
  });
}

function tokenText(text) {
  return JSON.stringify(text).slice(1, -1); // newlines and spaces visible in the tooltip
}

function showTip(span) {
  const tip = document.getElementById("tok-tip");
  const toks = span._tokens || [];
  replace(
    tip,
    toks.map((t) =>
      h(
        "div",
        {},
        h("div", {}, h("code", {}, `"${tokenText(t.text)}"`), ` logprob ${t.logprob.toFixed(3)} (p ${Math.exp(t.logprob).toFixed(3)})`),
        t.top?.length
          ? h("table", {}, h("tbody", {}, t.top.map((a) => h("tr", {}, h("td", {}, h("code", {}, `"${tokenText(a.text)}"`)), h("td", {}, a.logprob.toFixed(3))))))
          : null,
      ),
    ),
  );
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const w = tip.offsetWidth;
  const hgt = tip.offsetHeight;
  const left = Math.min(Math.max(4, r.left), window.innerWidth - w - 4);
  const top = r.bottom + 6 + hgt > window.innerHeight ? r.top - hgt - 6 : r.bottom + 6;
  tip.style.left = `${left}px`;
  tip.style.top = `${Math.max(4, top)}px`;
  span.classList.add("active");
}

function hideTip(span) {
  document.getElementById("tok-tip").hidden = true;
  span?.classList.remove("active");
}

// Token spans: hover shows the tooltip; in a focused answer, arrow keys move from token to token.
function wireTokens(out) {
  out.addEventListener("mouseover", (e) => e.target.classList?.contains("tok") && showTip(e.target));
  out.addEventListener("mouseout", (e) => e.target.classList?.contains("tok") && hideTip(e.target));
  out.addEventListener("focusin", (e) => e.target.classList?.contains("tok") && showTip(e.target));
  out.addEventListener("focusout", (e) => e.target.classList?.contains("tok") && hideTip(e.target));
  out.addEventListener("keydown", (e) => {
    if (!["ArrowRight", "ArrowLeft", "Home", "End"].includes(e.key)) return;
    const toks = Array.from(out.querySelectorAll(".tok"));
    if (!toks.length) return;
    const at = toks.indexOf(document.activeElement);
    let next = e.key === "Home" ? 0 : e.key === "End" ? toks.length - 1 : at + (e.key === "ArrowRight" ? 1 : -1);
    if (at < 0 && e.key.startsWith("Arrow")) next = 0;
    next = Math.max(0, Math.min(toks.length - 1, next));
    e.preventDefault();
    toks[next].focus();
  });
}

// The log-probability as a background: likely tokens plain, unlikely ones tinted.
function tint(logprob) {
  const p = Math.exp(logprob);
  return `rgba(240, 120, 40, ${((1 - p) * 0.45).toFixed(3)})`;
}

class Answer {
  constructor(out, meta) {
    this.out = out;
    this.meta = meta;
    this.decoder = new TextDecoder();
    this.pending = []; // tokens that hold part of a character: shown with the token that completes it
    this.count = 0;
  }

  reset() {
    replace(this.out);
    replace(this.meta);
    this.decoder = new TextDecoder();
    this.pending = [];
    this.count = 0;
  }

  span(text, tokens, cls = "tok") {
    const s = h("span", { class: cls, tabindex: "-1" }, text);
    s._tokens = tokens;
    const lp = tokens[tokens.length - 1].logprob;
    s.dataset.logprob = lp.toFixed(4);
    s.dataset.logprobs = tokens.map((t) => t.logprob.toFixed(4)).join(" ");
    if (cls === "tok") s.style.backgroundColor = tint(lp);
    this.out.append(s);
    this.count += tokens.length;
  }

  // One streamed line: its text delta and the tokens generated since the previous line.
  add(delta, tokens, finish) {
    let own = tokens || [];
    let eos = null;
    if (finish === "eos" && own.length) {
      eos = own[own.length - 1]; // EOS is counted and has a log-probability, but no text
      own = own.slice(0, -1);
    }
    const pieces = own.map((t) => this.decoder.decode(new Uint8Array(t.bytes), { stream: true }));
    if (finish && pieces.length) pieces[pieces.length - 1] += this.decoder.decode(); // a cut character: U+FFFD
    if (own.length && pieces.join("") === delta) {
      own.forEach((t, i) => {
        this.pending.push(t);
        if (pieces[i]) {
          this.span(pieces[i], this.pending);
          this.pending = [];
        }
      });
    } else if (delta) {
      this.out.append(delta); // text without matching tokens (e.g. cut at a stop string)
    }
    if (eos) this.span("⏎ end", [eos], "tok eos");
  }
}

function card(index, adapters, preset) {
  const out = h("div", { class: "out", tabindex: "0", role: "log", "aria-live": "polite", "aria-label": "Answer; arrow keys move between tokens" });
  const meta = h("p", { class: "meta" });
  const error = h("div", { class: "alert", role: "alert" });
  wireTokens(out);
  const answer = new Answer(out, meta);
  if (index === 0) {
    const el = h("section", { class: "card answer-card", dataset: { column: "base" } }, h("h2", {}, "Base model"), error, out, meta);
    return { el, answer, error, target: () => ({}), label: () => "base" };
  }
  const id = `col-${index}-${Math.random().toString(36).slice(2, 8)}`;
  const options = [];
  for (const a of adapters) {
    options.push(h("option", { value: a.name }, a.name));
    for (const v of (a.versions || []).filter((v) => !v.current)) {
      options.push(h("option", { value: `${a.name}@${v.id.slice(0, 12)}` }, `${a.name}@${v.id.slice(0, 12)} (pinned earlier version)`));
    }
  }
  options.push(h("option", { value: "__composition" }, "Weighted composition…"));
  const select = h("select", { id: `${id}-model` }, options);
  const comp = h("input", { id: `${id}-comp`, placeholder: "pirate:0.6, poet:0.4", autocomplete: "off" });
  const compField = h("div", { class: "field", hidden: true }, h("label", { for: `${id}-comp` }, "Adapters and weights"), comp);
  if (preset) {
    if (preset.includes(":")) {
      select.value = "__composition";
      comp.value = preset;
    } else select.value = preset;
  }
  const sync = () => (compField.hidden = select.value !== "__composition");
  select.addEventListener("change", sync);
  sync();
  const remove = h("button", { type: "button", class: "link" }, "Remove column");
  const el = h(
    "section",
    { class: "card answer-card", dataset: { column: String(index) } },
    h("h2", { class: "sr-only" }, `Column ${index + 1}`),
    h("div", { class: "field" }, h("label", { for: `${id}-model` }, "Adapter"), select),
    compField,
    error,
    out,
    meta,
    h("div", { class: "actions" }, remove),
  );
  const target = () => {
    if (select.value !== "__composition") return { adapter: select.value };
    return { adapters: parseComposition(comp.value) };
  };
  const label = () => (select.value === "__composition" ? comp.value : select.value);
  return { el, answer, error, target, label, remove };
}

async function run(col, base, signal) {
  col.error.textContent = "";
  col.answer.reset();
  let target;
  try {
    target = col.target();
  } catch (err) {
    col.error.textContent = err.message;
    return;
  }
  col.el.dataset.state = "streaming";
  const started = performance.now();
  let first = null;
  try {
    const r = await request("/generate", { method: "POST", json: { ...base, ...target, stream: true, logprobs: TOP_K }, signal });
    for await (const ev of events(r)) {
      if (ev.data === "[DONE]") break;
      const data = JSON.parse(ev.data);
      if (data.error) throw new ApiError(data.error.code === "timeout" ? 504 : 500, data);
      first ??= performance.now();
      col.answer.add(data.text, data.tokens, data.finish_reason);
      if (data.finish_reason) {
        const secs = (performance.now() - started) / 1000;
        const n = data.usage?.completion_tokens ?? col.answer.count;
        col.answer.meta.textContent = `${data.finish_reason} · ${n} tokens · first token ${((first - started) / 1000).toFixed(2)} s · ${(n / secs).toFixed(1)} tokens/s`;
        col.el.dataset.finish = data.finish_reason;
      }
    }
    col.el.dataset.state = "done";
  } catch (err) {
    col.el.dataset.state = "error";
    if (signal.aborted) {
      col.answer.meta.textContent = "stopped";
      return;
    }
    col.error.textContent = err.describe ? err.describe() : String(err);
  }
}

export async function renderPlayground(main, route, signal) {
  const { adapters } = await getJSON("/adapters", { signal });
  const prompt = h("textarea", { id: "prompt", rows: 3, required: true }, "Tell me a joke.");
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 48, required: true });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0, required: true });
  const raw = h("input", { type: "checkbox", id: "raw" });
  const generate = h("button", { type: "submit", id: "generate" }, "Generate");
  const stop = h("button", { type: "button", class: "secondary", id: "stop", disabled: true }, "Stop");
  const add = h("button", { type: "button", class: "secondary", id: "add-column" }, "Add adapter column");
  const grid = h("div", { class: "grid", id: "answers" });
  const columns = [card(0, adapters)];
  const relayout = () => {
    replace(grid, columns.map((c) => c.el));
    add.disabled = columns.length > MAX_EXTRA || !adapters.length;
  };
  const addColumn = (preset) => {
    const col = card(columns.length, adapters, preset);
    col.remove.addEventListener("click", () => {
      columns.splice(columns.indexOf(col), 1);
      relayout();
      add.focus();
    });
    columns.push(col);
    relayout();
    return col;
  };
  add.addEventListener("click", () => addColumn()?.el.querySelector("select").focus());
  const wanted = route.params.getAll("adapter").slice(0, MAX_EXTRA);
  for (const name of wanted.length ? wanted : adapters.slice(0, 1).map((a) => a.name)) addColumn(name);
  relayout();

  const form = h(
    "form",
    { id: "playground" },
    h("div", { class: "field" }, h("label", { for: "prompt" }, "Prompt"), prompt),
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, h("label", { for: "max-tokens" }, "Max new tokens"), maxTokens),
      h("div", { class: "field" }, h("label", { for: "temperature" }, "Temperature (0: greedy)"), temperature),
      h("label", { class: "check" }, raw, "Raw prompt (no template)"),
    ),
    h("div", { class: "actions" }, generate, stop, add),
  );
  main.append(
    h("h1", {}, "Playground"),
    form,
    h("p", { class: "muted" }, "Each column streams its own answer; hover a token (or focus an answer and use the arrow keys) for its log-probability and the top alternatives."),
    grid,
  );
  if (!adapters.length) main.append(h("p", { class: "muted" }, "No adapters yet: only the base model can answer."));

  let inflight = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    inflight?.abort();
    const ctl = new AbortController();
    inflight = ctl;
    signal.addEventListener("abort", () => ctl.abort(), { once: true });
    const base = { prompt: prompt.value, max_new_tokens: Number(maxTokens.value), temperature: Number(temperature.value), raw: raw.checked };
    generate.disabled = true;
    stop.disabled = false;
    await Promise.all(columns.map((c) => run(c, base, ctl.signal)));
    generate.disabled = false;
    stop.disabled = true;
  });
  stop.addEventListener("click", () => inflight?.abort());
}
