// New job: a JSONL of training rows (and optionally one of validation rows) goes to POST /datasets, then
// POST /train names the datasets, the adapter and a config (a preset, editable as JSON); the page then
// becomes the job's page.

import { ApiError, getJSON } from "./api.js";
import { dropZone, h, randomKey } from "./dom.js";

const NAME = "^[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}$";

function fileField(id, label, hint, required) {
  const input = h("input", { type: "file", id, name: id, accept: ".jsonl,.json,.ndjson,application/json,application/x-ndjson", required, "aria-describedby": `${id}-hint` });
  const chosen = h("p", { class: "muted", "aria-live": "polite" });
  const zone = h(
    "div",
    { class: "drop" },
    h("div", { class: "field" }, h("label", { for: id }, label), h("span", { class: "hint", id: `${id}-hint` }, hint), input),
    chosen,
  );
  dropZone(zone, input, (files) => {
    chosen.textContent = files.length ? `${files[0].name}, ${files[0].size} bytes` : "";
  });
  return { zone, input };
}

async function uploadDataset(file, signal) {
  const r = await getJSON("/datasets", { method: "POST", body: file, headers: { "Content-Type": "application/x-ndjson" }, signal });
  return r.dataset;
}

export async function renderNewJob(main, route, signal) {
  const presets = (await (await fetch("presets.json", { signal })).json()).presets;
  const adapter = h("input", { id: "adapter", name: "adapter", required: true, pattern: NAME, maxlength: 64, autocomplete: "off", "aria-describedby": "adapter-hint" });
  const train = fileField("train-file", "Training rows (JSONL)", "One row per line: prompt/response, prompt/completion, chat messages or text (docs/training.md). Drop the file here or choose it.", true);
  const val = fileField("val-file", "Validation rows (JSONL, optional)", "With validation rows the published adapter is the best evaluation's, and the job ends with an evaluation against the base.", false);
  const preset = h("select", { id: "preset", name: "preset" }, presets.map((p) => h("option", { value: p.id }, p.label)));
  const presetNote = h("span", { class: "hint", id: "preset-hint" });
  preset.setAttribute("aria-describedby", "preset-hint");
  const config = h("textarea", { id: "config", name: "config", rows: 12, spellcheck: "false", class: "mono", "aria-describedby": "config-hint" });
  const overwrite = h("input", { type: "checkbox", id: "overwrite", name: "overwrite" });
  const submit = h("button", { type: "submit", id: "start" }, "Start training");
  const status = h("p", { role: "status", class: "muted" });
  const error = h("div", { class: "alert", role: "alert", id: "new-error" });

  const choose = () => {
    const p = presets.find((x) => x.id === preset.value);
    config.value = JSON.stringify(p.config, null, 2);
    presetNote.textContent = p.description;
  };
  preset.addEventListener("change", choose);
  if (route.params.get("preset")) preset.value = route.params.get("preset");
  choose();

  const form = h(
    "form",
    { id: "new-job" },
    h("div", { class: "field" }, h("label", { for: "adapter" }, "Adapter name"), h("span", { class: "hint", id: "adapter-hint" }, "Letters, digits, '.', '_' and '-'; the name /generate serves it under."), adapter),
    train.zone,
    val.zone,
    h("div", { class: "field" }, h("label", { for: "preset" }, "Configuration preset"), presetNote, preset),
    h("div", { class: "field" }, h("label", { for: "config" }, "Configuration (JSON)"), h("span", { class: "hint", id: "config-hint" }, "lora: and training: keys, merged onto the trainer's defaults; the base model is the one this server serves."), config),
    h("label", { class: "check" }, overwrite, "Replace an adapter of this name if it exists"),
    h("div", { class: "actions" }, submit, status),
    error,
  );
  main.append(h("h1", {}, "New training job"), form);

  form.addEventListener("change", () => (error.textContent = "")); // an error is about what was sent
  let idempotencyKey = randomKey(); // one per attempt: a retried request cannot start a second job
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    let cfg;
    try {
      cfg = JSON.parse(config.value || "{}");
    } catch (err) {
      error.textContent = `The configuration is not valid JSON: ${err.message}`;
      config.focus();
      return;
    }
    if (!form.reportValidity()) return;
    submit.disabled = true;
    try {
      status.textContent = "Uploading the training rows…";
      const dataset = await uploadDataset(train.input.files[0], signal);
      let validation = null;
      if (val.input.files.length) {
        status.textContent = "Uploading the validation rows…";
        validation = await uploadDataset(val.input.files[0], signal);
      }
      status.textContent = "Starting the job…";
      const body = { adapter: adapter.value, dataset, config: cfg, overwrite: overwrite.checked };
      if (validation) body.validation_dataset = validation;
      const job = await getJSON("/train", { method: "POST", json: body, headers: { "Idempotency-Key": idempotencyKey }, signal });
      location.hash = `#/jobs/${encodeURIComponent(job.job_id)}`;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      error.textContent = err.describe();
      idempotencyKey = randomKey();
      status.textContent = "";
      submit.disabled = false;
    }
  });
}
