// Small DOM and formatting helpers shared by the pages. Text always goes in as text nodes (never HTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// A data table in a horizontal scroll box. With stack, a narrow screen shows each row as a block whose
// cells carry their column's name (data-label, from the header), instead of scrolling sideways.
export function table(caption, headers, rows, { numeric = [], stack = false } = {}) {
  const num = new Set(numeric);
  const body = rows instanceof HTMLTableSectionElement ? rows : h("tbody", {}, rows);
  body.dataset.labels = JSON.stringify(headers.map((t) => (t instanceof Node ? t.textContent : String(t))));
  label(body);
  return h(
    "div",
    { class: stack ? "scroll stack" : "scroll" },
    h(
      "table",
      { class: "data" },
      caption ? h("caption", { class: "sr-only" }, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((t, i) => h("th", { scope: "col", class: num.has(i) ? "num" : null }, t)))),
      body,
    ),
  );
}

function label(body) {
  const labels = JSON.parse(body.dataset.labels || "[]");
  for (const tr of body.rows) Array.from(tr.cells).forEach((cell, i) => (cell.dataset.label ??= labels[i] ?? ""));
}

// Refills a table's body (one that table() made) and labels the new cells.
export function fill(body, rows) {
  replace(body, rows);
  label(body);
}

export function statusBadge(status) {
  return h("span", { class: `status ${status}` }, status);
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return value.toFixed(digits);
}

export function percent(value) {
  return value === null || value === undefined ? "—" : `${(value * 100).toFixed(1)} %`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// A sleep that ends early (rejecting) when the page is left.
export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    });
  });
}

// A file <input> inside a drop zone: files dropped on the zone land in the input, so keyboard users and
// drag and drop take the same path.
export function dropZone(zone, input, onChange) {
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (!e.dataTransfer?.files?.length) return;
    input.files = e.dataTransfer.files;
    input.dispatchEvent(new Event("change"));
  });
  input.addEventListener("change", () => onChange && onChange(input.files));
}

export function randomKey() {
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context; this does not
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
