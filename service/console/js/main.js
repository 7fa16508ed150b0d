// The console's router: #/jobs, #/jobs/<id>, #/new, #/adapters, #/playground[?adapter=name].
// Each page is a function (main element, route, AbortSignal); leaving a page aborts its signal, which
// closes its streams and stops its polling.

import { initKeyButton } from "./api.js";
import { renderAdapters } from "./adapters.js";
import { replace, h } from "./dom.js";
import { renderJob, renderJobs } from "./jobs.js";
import { renderNewJob } from "./newjob.js";
import { renderPlayground } from "./playground.js";

const PAGES = {
  jobs: { title: "Jobs", render: renderJobs },
  job: { title: "Job", nav: "jobs", render: renderJob },
  new: { title: "New job", render: renderNewJob },
  adapters: { title: "Adapters", render: renderAdapters },
  playground: { title: "Playground", render: renderPlayground },
};

let current = null;
let firstPage = true;

function parse(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "jobs" && parts[1]) return { page: "job", id: parts[1], params };
  if (parts[0] in PAGES) return { page: parts[0], params };
  return null;
}

async function route() {
  if (!location.hash.startsWith("#/")) {
    if (!location.hash) history.replaceState(null, "", "#/jobs");
    else return; // an in-page anchor, not a page
  }
  const r = parse(location.hash);
  if (!r) {
    location.replace("#/jobs");
    return;
  }
  current?.abort();
  current = new AbortController();
  const page = PAGES[r.page];
  const nav = page.nav || r.page;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${page.title} · loraserve console`;
  const main = document.getElementById("main");
  replace(main);
  try {
    const rendering = page.render(main, r, current.signal);
    if (!firstPage) focusHeading(main); // the heading is drawn before the page's first await
    firstPage = false;
    await rendering;
  } catch (err) {
    if (err?.name === "AbortError" || current.signal.aborted) return;
    main.append(h("p", { class: "alert", role: "alert" }, err.describe ? err.describe() : String(err)));
  }
}

// Moves focus to the new page's heading, so keyboard and screen-reader users start there.
function focusHeading(main) {
  const h1 = main.querySelector("h1");
  if (h1) {
    h1.tabIndex = -1;
    h1.focus({ preventScroll: true });
  }
}

async function serverState() {
  const el = document.getElementById("server-state");
  try {
    const r = await fetch(new URL("../health/ready", document.baseURI));
    const s = await r.json();
    const weights = s.random_weights ? ", random weights" : "";
    el.textContent = `${s.model || "no model"} on ${s.device || "?"} · ${s.role} · ${s.status}${weights}`;
  } catch {
    el.textContent = "server unreachable";
  }
}

window.addEventListener("hashchange", route);
document.getElementById("skip").addEventListener("click", (e) => {
  e.preventDefault();
  focusHeading(document.getElementById("main"));
});
initKeyButton();
serverState();
route();
