// Adapters: GET /adapters as a table (versions, loaded, size, rank, template), upload by
// PUT /adapters/{name} (multipart: adapter_config, adapter_model, optional template), DELETE.

import { ApiError, getJSON } from "./api.js";
import { bytes, dropZone, fill, h, replace, table, when } from "./dom.js";

const NAME = "^[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}$";

function versions(info) {
  return h(
    "ul",
    { class: "versions" },
    (info.versions || []).map((v) =>
      h("li", {}, h("code", { title: v.id }, v.id.slice(0, 12)), v.current ? h("strong", {}, " current") : "", h("span", { class: "muted" }, ` ${bytes(v.size_bytes)}, ${when(v.created)}`)),
    ),
  );
}

function template(info) {
  if (!info.template) return h("span", { class: "muted" }, "none");
  return h("details", {}, h("summary", {}, "template"), h("pre", {}, JSON.stringify(info.template, null, 2)));
}

function uploadForm(onDone) {
  const name = h("input", { id: "upload-name", required: true, pattern: NAME, maxlength: 64, autocomplete: "off" });
  const files = h("input", { type: "file", id: "upload-files", multiple: true, accept: ".json,.safetensors", required: true, "aria-describedby": "upload-files-hint" });
  const chosen = h("ul", { "aria-live": "polite" });
  const tmpl = h("textarea", { id: "upload-template", rows: 3, class: "mono", spellcheck: "false", "aria-describedby": "upload-template-hint" });
  const submit = h("button", { type: "submit", id: "upload" }, "Upload adapter");
  const status = h("p", { role: "status", class: "muted" });
  const error = h("div", { class: "alert", role: "alert", id: "upload-error" });

  // adapter_config.json and adapter_model.safetensors, by extension, whatever their file names.
  const pick = () => {
    const all = Array.from(files.files || []);
    return { config: all.find((f) => f.name.endsWith(".json")), model: all.find((f) => f.name.endsWith(".safetensors")) };
  };
  const zone = h(
    "div",
    { class: "drop", id: "upload-drop" },
    h(
      "div",
      { class: "field" },
      h("label", { for: "upload-files" }, "Adapter files"),
      h("span", { class: "hint", id: "upload-files-hint" }, "Drop adapter_config.json and adapter_model.safetensors here together, or choose both."),
      files,
    ),
    chosen,
  );
  dropZone(zone, files, () => {
    const { config, model } = pick();
    replace(chosen, h("li", {}, "config: ", config ? config.name : "missing"), h("li", {}, "weights: ", model ? `${model.name}, ${bytes(model.size)}` : "missing"));
  });

  const form = h(
    "form",
    { id: "upload-form", class: "card" },
    h("div", { class: "field" }, h("label", { for: "upload-name" }, "Name"), name),
    zone,
    h(
      "div",
      { class: "field" },
      h("label", { for: "upload-template" }, "Template (JSON, optional)"),
      h("span", { class: "hint", id: "upload-template-hint" }, 'The prompt template\'s fields, e.g. {"user": "Human: {content}\\n", "assistant_prefix": "Assistant:"}; without it the default human/assistant template.'),
      tmpl,
    ),
    h("div", { class: "actions" }, submit, status),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const { config, model } = pick();
    if (!config || !model) {
      error.textContent = "Choose both files: adapter_config.json and adapter_model.safetensors.";
      return;
    }
    const body = new FormData();
    body.append("adapter_config", config, "adapter_config.json");
    body.append("adapter_model", model, "adapter_model.safetensors");
    if (tmpl.value.trim()) body.append("template", tmpl.value.trim());
    submit.disabled = true;
    status.textContent = "Uploading…";
    try {
      const info = await getJSON(`/adapters/${encodeURIComponent(name.value)}`, { method: "PUT", body });
      status.textContent = `Published ${info.name} (version ${info.sha256.slice(0, 12)}).`;
      form.reset();
      replace(chosen);
      onDone();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      error.textContent = err.describe();
      status.textContent = "";
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export async function renderAdapters(main, _route, signal) {
  const body = h("tbody");
  const note = h("p", { class: "muted", role: "status" });
  const error = h("div", { class: "alert", role: "alert" });

  const load = async () => {
    const { adapters } = await getJSON("/adapters", { signal });
    fill(
      body,
      adapters.map((a) => {
        const del = h("button", { type: "button", class: "danger", "aria-label": `Delete adapter ${a.name}` }, "Delete");
        del.addEventListener("click", async () => {
          if (!confirm(`Delete adapter ${a.name} and every kept version? Requests already running finish.`)) return;
          try {
            await getJSON(`/adapters/${encodeURIComponent(a.name)}`, { method: "DELETE", signal });
            note.textContent = `Deleted ${a.name}.`;
            await load();
          } catch (err) {
            if (!(err instanceof ApiError)) throw err;
            error.textContent = err.describe();
          }
        });
        return h(
          "tr",
          { dataset: { adapter: a.name } },
          h("th", { scope: "row" }, h("span", { class: "mono" }, a.name), h("div", { class: "muted" }, a.base_model || "")),
          h("td", { class: "num" }, `r ${a.rank}`, h("div", { class: "muted" }, `α ${a.alpha}`)),
          h("td", { class: "num" }, bytes(a.size_bytes)),
          h("td", {}, a.loaded ? h("span", { class: "yes" }, "loaded") : h("span", { class: "no" }, "not loaded")),
          h("td", {}, versions(a)),
          h("td", { class: "hide-narrow" }, h("span", { class: "muted" }, (a.target_modules || []).join(", ")), template(a)),
          h("td", {}, h("div", { class: "actions" }, h("a", { href: `#/playground?adapter=${encodeURIComponent(a.name)}` }, "Try"), del)),
        );
      }),
    );
    note.textContent = adapters.length ? `${adapters.length} adapter(s)` : "No adapters yet: train one (New job) or upload one below.";
  };

  main.append(
    h("h1", {}, "Adapters"),
    error,
    table("Adapters on this server", ["Name", "Rank", "Size", "Cache", "Versions (newest first)", h("span", { class: "hide-narrow" }, "Modules, template"), "Actions"], body, { numeric: [1, 2], stack: true }),
    note,
    h("p", { class: "muted" }, '"loaded": resident in the generation worker\'s adapter cache. A version is served as name@<id prefix> (pinned) until the server drops it.'),
    h("h2", {}, "Upload an adapter"),
    uploadForm(() => load().catch((err) => (error.textContent = err.describe ? err.describe() : String(err)))),
  );
  await load();
}
