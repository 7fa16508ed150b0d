// Jobs: the list (GET /train, polled) and one job's page (GET /train/{id}/events streamed: loss curves,
// the published step, the served evaluation, warnings, the log's tail, cancel).

import { ApiError, events, getJSON, request } from "./api.js";
import { LossChart } from "./charts.js";
import { fill, fmt, h, percent, replace, seconds, sleep, statusBadge, table, when } from "./dom.js";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const LOG_TAIL_BYTES = 8192;

function progressCell(job) {
  const p = job.progress || {};
  if (!p.total_steps) return job.status === "queued" ? "waiting" : "—";
  const label = `${p.step} / ${p.total_steps} steps`;
  return h("span", {}, h("progress", { max: p.total_steps, value: p.step, "aria-label": `job ${job.job_id}: ${label}` }), " ", label);
}

export async function renderJobs(main, _route, signal) {
  const body = h("tbody");
  const note = h("p", { class: "muted", role: "status" });
  main.append(
    h("h1", {}, "Training jobs"),
    h("p", {}, h("a", { href: "#/new", class: "button" }, "New job")),
    table("Training jobs, newest first", ["Job", "Adapter", "Status", "Progress", "Loss", h("span", { class: "hide-narrow" }, "Created")], body, { stack: true }),
    note,
  );
  for (;;) {
    const { jobs } = await getJSON("/train?limit=100", { signal });
    fill(
      body,
      jobs.map((job) =>
        h(
          "tr",
          { dataset: { job: job.job_id, status: job.status } },
          h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}`, class: "mono" }, job.job_id)),
          h("td", {}, job.adapter),
          h("td", {}, statusBadge(job.status), job.cancel_requested ? " (cancelling)" : ""),
          h("td", {}, progressCell(job)),
          h("td", { class: "num" }, fmt(job.progress?.loss)),
          h("td", { class: "hide-narrow" }, when(job.created_at)),
        ),
      ),
    );
    note.textContent = jobs.length ? `${jobs.length} job(s); refreshed ${new Date().toLocaleTimeString()}` : "No jobs yet.";
    const active = jobs.some((j) => !FINISHED.has(j.status));
    await sleep(active ? 2000 : 5000, signal);
  }
}

// --- one job --------------------------------------------------------------------------------------

function facts(job) {
  const p = job.progress || {};
  const items = [
    ["Adapter", job.adapter],
    ["Status", job.status + (job.cancel_requested ? " (cancel requested)" : "")],
    ["Step", p.total_steps ? `${p.step} / ${p.total_steps}` : String(p.step ?? 0)],
    ["Epoch", fmt(p.epoch, 2)],
    ["Training loss", fmt(p.loss)],
    ["Eval loss", fmt(p.eval_loss)],
    ["Best step", fmt(p.best_step)],
    ["Best eval loss", fmt(p.best_eval_loss)],
    ["Published", p.selected ?? "—"],
    ["Tokens/s", fmt(p.tokens_per_second, 0)],
    ["ETA", FINISHED.has(job.status) ? "—" : seconds(p.eta_seconds)],
    ["Yielded to serving", seconds(p.yielded_seconds)],
    ["Rows", fmt(job.rows)],
    ["Attempts", fmt(job.attempts)],
    ["Created", when(job.created_at)],
    ["Finished", when(job.finished_at)],
  ];
  return items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { dataset: { fact: k } }, v)));
}

// Which step the line marks: the published weights once the job is done, else the best evaluation so far.
function markOf(job) {
  const p = job.progress || {};
  if (p.selected === "best" && p.best_step !== null) return { step: p.best_step, label: `published: step ${p.best_step} (best)` };
  if (p.selected === "last") return { step: p.step, label: `published: step ${p.step} (last)` };
  if (p.best_step !== null && p.best_step !== undefined) return { step: p.best_step, label: `best so far: step ${p.best_step}` };
  return null;
}

const fixed = (digits) => (v) => (v === null || v === undefined ? "—" : v.toFixed(digits));
const METRICS = [
  ["exact_match", "Exact match", percent],
  ["rouge_l", "ROUGE-L", fixed(3)],
  ["bleu", "BLEU", fixed(3)],
  ["eos_rate", "EOS rate", percent],
  ["mean_tokens", "Mean tokens", fixed(1)],
];

function evalSection(job) {
  const ev = job.eval;
  if (!ev) {
    const why = FINISHED.has(job.status)
      ? "No served evaluation: the job had no validation rows, or the evaluation could not run (see the warnings)."
      : "The served evaluation (adapter against the base on the validation rows) comes when the job succeeds.";
    return h("p", { class: "muted" }, why);
  }
  const metricRows = METRICS.map(([key, label, show]) =>
    h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num" }, show(ev.base?.[key])), h("td", { class: "num" }, show(ev.adapter?.[key]))),
  );
  const answer = (text, reference) =>
    h("td", { class: "answer" }, text, text === reference ? h("span", { class: "match" }, " ✓ exact") : null);
  const rows = (ev.rows || []).map((row) =>
    h("tr", {}, h("td", { class: "num" }, row.index), h("td", { class: "answer" }, row.reference), answer(row.base, row.reference), answer(row.adapter, row.reference)),
  );
  return h(
    "div",
    { id: "eval" },
    h("div", { id: "eval-metrics" }, table("Evaluation metrics, base against adapter", ["Metric", "Base", `Adapter (${job.adapter})`], metricRows, { numeric: [1, 2] })),
    h("p", { class: "muted" }, `Greedy answers, at most ${ev.max_new_tokens} new tokens each.`),
    h("h3", {}, "Answers"),
    h("div", { id: "eval-rows" }, table("Answers per validation row", ["#", "Reference", "Base", "Adapter"], rows, { numeric: [0], stack: true })),
  );
}

function valuesTable(chart) {
  const [steps, train, val] = chart.data();
  const rows = steps.map((s, i) => h("tr", {}, h("td", { class: "num" }, s), h("td", { class: "num" }, fmt(train[i])), h("td", { class: "num" }, fmt(val[i]))));
  return table("Loss per step", ["Step", "Training loss", "Validation loss"], rows, { numeric: [0, 1, 2] });
}

export async function renderJob(main, route, signal) {
  const id = route.id;
  const title = h("h1", {}, "Job ", h("span", { class: "mono" }, id), " ");
  const factList = h("dl", { class: "facts", "aria-live": "off" });
  const errorBox = h("div", { class: "alert", role: "alert" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel", disabled: true }, "Cancel job"); // until the job is known
  const playground = h("a", { class: "button secondary", hidden: true }, "Try in the playground");
  const chartBox = h("div", { class: "chart-box", id: "loss-chart", role: "img", "aria-label": "Training and validation loss per step" });
  const caption = h("figcaption", {}, "Waiting for the first step…");
  const values = h("details", {}, h("summary", {}, "Loss values as a table"), h("div"));
  const evalBox = h("div");
  const warnings = h("ul", { class: "warnings", id: "warnings" });
  const log = h("pre", { class: "log", id: "log", tabindex: "0", "aria-label": "Training log, last lines" });
  main.append(
    title,
    factList,
    errorBox,
    h("div", { class: "actions" }, cancel, playground),
    h("h2", {}, "Loss"),
    h("figure", { class: "chart" }, chartBox, caption),
    values,
    h("h2", {}, "Evaluation"),
    evalBox,
    h("h2", {}, "Warnings"),
    warnings,
    h("h2", {}, "Log (last lines)"),
    log,
  );

  const chart = new LossChart(chartBox);
  signal.addEventListener("abort", () => chart.destroy());
  let job = await getJSON(`/train/${encodeURIComponent(id)}`, { signal });

  const show = () => {
    replace(title, "Job ", h("span", { class: "mono" }, id), " ", statusBadge(job.status));
    replace(factList, facts(job));
    errorBox.textContent = job.error || "";
    cancel.disabled = FINISHED.has(job.status) || job.cancel_requested;
    playground.hidden = job.status !== "succeeded";
    playground.href = `#/playground?adapter=${encodeURIComponent(job.adapter)}`;
    chart.setMark(markOf(job));
    chart.draw();
    const mark = markOf(job);
    caption.textContent = chart.train.size
      ? `${chart.train.size} training and ${chart.val.size} validation points` + (mark ? `; ${mark.label}` : "")
      : "Waiting for the first step…";
    if (values.open) replace(values.lastElementChild, valuesTable(chart)); // built when looked at
    replace(evalBox, evalSection(job));
    replace(warnings, (job.warnings || []).map((w) => h("li", {}, w)));
    if (!(job.warnings || []).length) warnings.append(h("li", { class: "muted" }, "none"));
  };

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await getJSON(`/train/${encodeURIComponent(id)}`, { method: "DELETE", signal });
      show();
    } catch (err) {
      if (err instanceof ApiError) errorBox.textContent = err.describe();
      else throw err;
    }
  });

  let logDirty = true;
  const refreshLog = async () => {
    const r = await request(`/train/${encodeURIComponent(id)}/logs?tail=${LOG_TAIL_BYTES}`, { signal });
    const text = await r.text();
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = text || "(empty)";
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  const logLoop = async () => {
    for (;;) {
      if (logDirty) {
        logDirty = false;
        await refreshLog();
      }
      if (FINISHED.has(job.status)) {
        await refreshLog();
        return;
      }
      await sleep(2000, signal);
    }
  };

  values.addEventListener("toggle", () => values.open && replace(values.lastElementChild, valuesTable(chart)));
  show();
  const logs = logLoop().catch(() => {});
  let lastId = null;
  let redraw = null;
  const scheduleShow = () => {
    if (redraw) return;
    redraw = requestAnimationFrame(() => {
      redraw = null;
      show();
    });
  };
  // The stream replays a finished job's progress, then ends with its final status; a dropped
  // connection resumes after the last event seen (Last-Event-ID).
  while (!signal.aborted) {
    try {
      const headers = lastId === null ? {} : { "Last-Event-ID": lastId };
      const r = await request(`/train/${encodeURIComponent(id)}/events`, { headers, signal });
      for await (const ev of events(r)) {
        if (ev.id !== null) lastId = ev.id;
        const data = JSON.parse(ev.data);
        const p = data.progress || {};
        if (data.event === "step") chart.add("train", p.step, p.loss);
        else if (data.event === "eval") chart.add("val", p.step, p.last_eval_loss ?? p.eval_loss);
        else if (data.event === "start" || data.event === "checkpoint") logDirty = true;
        const { event: _event, message: _message, ...rest } = data;
        job = rest;
        scheduleShow();
      }
      if (FINISHED.has(job.status)) break;
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status < 500) {
        errorBox.textContent = err.describe(); // e.g. the job is gone: reconnecting will not help
        return;
      }
      errorBox.textContent = `event stream interrupted (${err.describe ? err.describe() : err}); reconnecting…`;
    }
    await sleep(1000, signal);
  }
  // The final status event carries the eval report and warnings; show them with the final log.
  show();
  await logs;
}
