// The public HTTP API from the browser: the API key (asked once, kept in this tab's sessionStorage),
// the error envelope, and Server-Sent Events read from fetch (EventSource cannot send the key).

const KEY_STORE = "loraserve.apiKey";
// The API lives beside /ui/: resolving ".." keeps working behind a proxy that adds a path prefix.
const BASE = new URL("..", document.baseURI);

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
  // One line a person can act on: the message, and which field it is about.
  describe() {
    const where = this.param ? ` (${this.param})` : "";
    return `${this.status} ${this.code || "error"}: ${this.message}${where}`;
  }
}

export function url(path) {
  return new URL(path.replace(/^\//, ""), BASE).toString();
}

export function hasKey() {
  return sessionStorage.getItem(KEY_STORE) !== null;
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  keyChanged();
}

let asking = null; // one dialog for every request that needs the key at once

function askKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  asking = new Promise((resolve) => {
    const done = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      input.value = "";
      form.removeEventListener("submit", done);
      dialog.close();
      asking = null;
      keyChanged();
      resolve();
    };
    form.addEventListener("submit", done);
    dialog.addEventListener("cancel", (e) => e.preventDefault(), { once: true }); // Esc: nothing works without it
    dialog.showModal();
    input.focus();
  });
  return asking;
}

function keyChanged() {
  document.getElementById("forget-key").hidden = !hasKey();
}

// fetch() against the API with the key; a 401 asks for the key and tries again. Non-2xx throws ApiError.
export async function request(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  for (;;) {
    const h = new Headers(headers);
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h.set("Authorization", `Bearer ${key}`);
    let payload = body;
    if (json !== undefined) {
      h.set("Content-Type", "application/json");
      payload = JSON.stringify(json);
    }
    const r = await fetch(url(path), { method, headers: h, body: payload, signal });
    if (r.status === 401) {
      const err = await r.json().catch(() => ({}));
      const code = err.error && err.error.code;
      const reason =
        code === "invalid_api_key"
          ? "The server did not accept that key. Enter the API key again."
          : "This server needs an API key. It is kept in this browser tab only (sessionStorage).";
      sessionStorage.removeItem(KEY_STORE);
      await askKey(reason);
      continue;
    }
    if (!r.ok) {
      throw new ApiError(r.status, await r.json().catch(() => null));
    }
    return r;
  }
}

export async function getJSON(path, opts) {
  return (await request(path, opts)).json();
}

// Server-Sent Events of a fetch response: yields {id, data} per event; comment lines are skipped.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          else if (line.startsWith("id:")) id = line.slice(3).trim();
        }
        if (data.length) yield { id, data: data.join("\n") };
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a consumer that stops early closes the connection
  }
}

export function initKeyButton() {
  const button = document.getElementById("forget-key");
  button.addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  keyChanged();
}
