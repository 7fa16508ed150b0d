"""The web console (GET /ui) in a real browser: headless Chromium (Debian's) driven by Selenium, against
the real server on loopback (tiny base, fp32, an API key).

One server and one demo job for the module: the README's demo job (examples/fixed_sentence.jsonl with
the demo preset, examples/demo.json) is started from the console's New job page with validation rows,
so it ends with a served evaluation. The tests then check what a person sees against what the API
says: the live loss curve and its published step, the eval table, the adapters and an upload, the
playground's streamed answers and their per-token log-probabilities; every page at 1280x800 and
390x844 without sideways overflow, labels, the keyboard. Screenshots of every page go to the pytest
temporary folder (``console-screenshots*``), and also to ``$LORASERVE_CONSOLE_SCREENSHOTS`` when set
(how docs/ui/ is refreshed).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testing.server import REPO, Server, running_server
from tests.helpers.adapters import CHECK_PROMPTS
from tests.helpers.browser import Browser, chromium

pytestmark = pytest.mark.slow
API_KEY = "console-key"
SENTENCE = "I am the demo adapter and this is my only answer."
VAL_ROWS = [{"prompt": p, "response": SENTENCE} for p in CHECK_PROMPTS]
EXPECTED_401 = ("status of 401",)  # the console's first call, before it asks for the key
DESKTOP, PHONE = (1280, 800), (390, 844)


@dataclass
class Env:
    server: Server
    browser: Browser
    root: Path
    shots: Path

    @property
    def ui(self) -> str:
        return f"{self.server.url}/ui/"

    @property
    def driver(self):
        return self.browser.driver

    def shot(self, name: str) -> Path:
        path = self.browser.screenshot(self.shots / f"{name}.png")
        extra = os.environ.get("LORASERVE_CONSOLE_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    def wait(self, condition, timeout: float = 30.0, what: str = "the page"):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda d: condition(d), message=f"{what} within {timeout:.0f} s"
        )

    def open(self, route: str, ready_css: str = "main h1") -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(self.ui + route)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ready_css), what=f"{route}: {ready_css}")

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def no_errors(self) -> None:
        assert self.browser.console_errors(EXPECTED_401) == []


@pytest.fixture(scope="module")
def env(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("console")
    shots = tmp_path_factory.mktemp("console-screenshots")
    args = ("--dtype", "float32")  # the playground's answers equal the API's, batch or not
    with (
        running_server(tiny_base, root / "adapters", root / "data", api_key=API_KEY, args=args) as srv,
        chromium() as browser,
    ):
        browser.viewport(*DESKTOP)
        yield Env(srv, browser, root, shots)
    print(f"console screenshots: {shots}")


@pytest.fixture(scope="module")
def api(env: Env) -> Iterator[httpx.Client]:
    with env.server.client(timeout=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def signed_in(env: Env) -> Env:
    """The console asks for the key on its first call (a wrong one again), then keeps it for the tab."""
    from selenium.webdriver.common.by import By

    d = env.driver
    d.get(env.ui)
    key = env.wait(
        lambda d: (k := d.find_element(By.ID, "key-input")).is_displayed() and k, what="the key dialog"
    )
    env.shot("key-dialog")
    key.send_keys("not-the-key\n")
    env.wait(lambda d: "did not accept" in d.find_element(By.ID, "key-reason").text, what="the second ask")
    d.find_element(By.ID, "key-input").send_keys(API_KEY + "\n")
    env.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "main h1"), what="the jobs page")
    assert not d.find_element(By.ID, "key-dialog").is_displayed()
    d.refresh()  # sessionStorage: the same tab does not ask again
    env.wait(lambda d: d.find_element(By.CSS_SELECTOR, "main [role=status]").text, what="the jobs list")
    assert not d.find_element(By.ID, "key-dialog").is_displayed()
    assert d.execute_script("return sessionStorage.getItem('loraserve.apiKey')") == API_KEY
    return env


@pytest.fixture(scope="module")
def demo_job(signed_in: Env) -> str:
    """The README's demo job, started from the New job page; returns its id once its page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    env = signed_in
    val = env.root / "validation.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in VAL_ROWS))
    env.open("#/new", "#adapter")
    env.css("#adapter")[0].send_keys("demo")
    # A bad row first: the page shows the API's error, naming the row, and starts nothing.
    bad = env.root / "bad.jsonl"
    bad.write_text(json.dumps(VAL_ROWS[0]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    env.css("#train-file")[0].send_keys(str(bad))
    env.driver.find_element(By.ID, "start").click()
    env.wait(lambda d: "data[1]" in env.css("#new-error")[0].text, what="the bad row named")
    assert "#/new" in env.driver.current_url and env.css("#start")[0].is_enabled()
    refused = env.browser.console_errors(EXPECTED_401)  # the browser logs the 422 it was given
    assert refused and all("/datasets" in e and "422" in e for e in refused), refused
    env.css("#train-file")[0].send_keys(str(REPO / "examples" / "fixed_sentence.jsonl"))
    env.css("#val-file")[0].send_keys(str(val))
    Select(env.css("#preset")[0]).select_by_value("demo")
    shown = json.loads(env.css("#config")[0].get_attribute("value"))
    assert shown == json.loads((REPO / "examples" / "demo.json").read_text())
    env.shot("new-job")
    env.driver.find_element(By.ID, "start").click()
    env.wait(lambda d: "#/jobs/job-" in d.current_url, what="the job page")
    return env.driver.current_url.rsplit("/", 1)[1]


# --- the server side: files open, API closed ----------------------------------------------------------


def test_console_files_are_served_without_the_key_and_the_api_still_needs_it(env: Env) -> None:
    url = env.server.url
    with httpx.Client(timeout=30.0) as http:
        r = http.get(f"{url}/ui")
        assert r.status_code == 308 and r.headers["location"] == "/ui/"
        page = http.get(f"{url}/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp  # nothing from elsewhere
        js = http.get(f"{url}/ui/js/main.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        again = http.get(f"{url}/ui/js/main.js", headers={"If-None-Match": js.headers["etag"]})
        assert again.status_code == 304
        missing = http.get(f"{url}/ui/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "path"
        # a path that climbs out of /ui/ is not a way around the key
        for sneaky in ("/ui/../train", "/ui/%2e%2e/train", "/ui//train"):
            r = http.send(http.build_request("GET", url + sneaky))
            assert r.status_code in (401, 404) and "jobs" not in r.text, sneaky
        assert http.get(f"{url}/train").json()["error"]["code"] == "missing_api_key"
        assert http.get(f"{url}/adapters").status_code == 401


def test_console_is_offline_and_its_demo_preset_is_examples_demo_json() -> None:
    root = REPO / "service" / "console"
    for path in [*root.rglob("*.html"), *root.glob("js/*.js"), *root.glob("*.css")]:
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, f"{path}: the console loads nothing remote"
    presets = {p["id"]: p["config"] for p in json.loads((root / "presets.json").read_text())["presets"]}
    assert presets["demo"] == json.loads((REPO / "examples" / "demo.json").read_text())
    assert (root / "vendor" / "uplot-1.6.32" / "LICENSE").read_text().startswith("The MIT License")


# --- jobs -------------------------------------------------------------------------------------------


CANVAS_COLOURS_JS = """
const canvas = document.querySelector('#loss-chart canvas');
const ctx = canvas.getContext('2d');
const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
const near = (i, rgb) => Math.abs(data[i] - rgb[0]) < 40 && Math.abs(data[i+1] - rgb[1]) < 40
                         && Math.abs(data[i+2] - rgb[2]) < 40 && data[i+3] > 200;
let train = 0, val = 0;
for (let i = 0; i < data.length; i += 4) {
  if (near(i, [31, 95, 191])) train++;  // --train
  if (near(i, [210, 105, 30])) val++;   // --val
}
return {train, val};
"""


def test_the_job_page_draws_live_loss_curves_and_fills_the_eval_table(
    env: Env, demo_job: str, api: httpx.Client
) -> None:
    # The page never reloads: the curve grows from the event stream while the job trains.
    seen: list[int] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        box = env.css("#loss-chart")[0]
        seen.append(int(box.get_attribute("data-train-points") or 0))
        if env.css("h1 .status.succeeded, h1 .status.failed, h1 .status.cancelled"):
            break
        time.sleep(0.2)
    job = api.get(f"/train/{demo_job}").json()
    assert job["status"] == "succeeded", job
    total = job["progress"]["total_steps"]
    assert any(0 < n < total for n in seen), f"no partial curve was ever drawn: {sorted(set(seen))}"
    env.wait(lambda d: env.css("#eval-metrics"), what="the eval table")  # the final status event carries it

    # The curve holds every logged step and evaluation the API streams, and the canvas shows both lines.
    with api.stream("GET", f"/train/{demo_job}/events") as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    steps = {e["progress"]["step"] for e in events if e["event"] == "step"}
    evals = {e["progress"]["step"] for e in events if e["event"] == "eval"}
    box = env.css("#loss-chart")[0]
    assert int(box.get_attribute("data-train-points")) == len(steps) == total  # logging_steps 1
    assert int(box.get_attribute("data-val-points")) == len(evals) >= 1
    assert int(box.get_attribute("data-mark")) == job["progress"]["best_step"]  # selected: best
    assert job["progress"]["selected"] == "best"
    colours = env.driver.execute_script(CANVAS_COLOURS_JS)
    assert colours["train"] > 50 and colours["val"] > 10, colours
    caption = env.css("figure.chart figcaption")[0].text
    assert f"{total} training and {len(evals)} validation points" in caption
    assert f"published: step {job['progress']['best_step']} (best)" in caption

    # The eval table is the job's served evaluation: base against adapter, then the answers row by row.
    ev = job["eval"]
    cells = [
        [td.text for td in tr.find_elements("css selector", "th, td")]
        for tr in env.css("#eval-metrics tbody tr")
    ]
    assert [c[0] for c in cells] == ["Exact match", "ROUGE-L", "BLEU", "EOS rate", "Mean tokens"]
    assert cells[0][1:] == [
        f"{ev['base']['exact_match'] * 100:.1f} %",
        f"{ev['adapter']['exact_match'] * 100:.1f} %",
    ]
    assert cells[1][1:] == [f"{ev['base']['rouge_l']:.3f}", f"{ev['adapter']['rouge_l']:.3f}"]
    assert cells[3][1:] == [
        f"{ev['base']['eos_rate'] * 100:.1f} %",
        f"{ev['adapter']['eos_rate'] * 100:.1f} %",
    ]
    assert cells[4][1:] == [f"{ev['base']['mean_tokens']:.1f}", f"{ev['adapter']['mean_tokens']:.1f}"]
    rows = env.css("#eval-rows tbody tr")
    assert len(rows) == len(VAL_ROWS) == len(ev["rows"])
    for tr, row in zip(rows, ev["rows"], strict=True):
        index, reference, base, adapter = (td.text for td in tr.find_elements("css selector", "td"))
        assert (int(index), reference) == (row["index"], SENTENCE)
        assert base.removesuffix(" ✓ exact") == row["base"].strip()
        assert adapter.removesuffix(" ✓ exact") == row["adapter"].strip()
    warnings = [li.text for li in env.css("#warnings li")]
    assert warnings == (job["warnings"] or ["none"])
    log = env.css("#log")[0].text
    assert "trainable params" in log  # the trainer's own output, from /train/{id}/logs
    assert env.css("#cancel")[0].get_attribute("disabled") is not None  # finished: nothing to cancel
    env.shot("job")
    env.no_errors()


def test_the_jobs_list_shows_the_job(env: Env, demo_job: str) -> None:
    env.open("#/jobs", f"tr[data-job='{demo_job}']")
    row = env.css(f"tr[data-job='{demo_job}']")[0]
    assert row.get_attribute("data-status") == "succeeded"
    assert "36 / 36 steps" in row.text and "demo" in row.text
    env.shot("jobs")
    env.no_errors()


def test_a_job_is_cancelled_from_its_page(env: Env, demo_job: str, api: httpx.Client) -> None:
    rows = [json.loads(line) for line in (REPO / "examples" / "fixed_sentence.jsonl").open()]
    body = {"adapter": "long", "data": rows, "config": {"training": {"num_train_epochs": 50}}}
    job = api.post("/train", json=body).json()
    env.open(f"#/jobs/{job['job_id']}", "#cancel")
    env.wait(lambda d: env.css("#cancel")[0].is_enabled(), what="an enabled cancel button")
    env.css("#cancel")[0].click()
    env.wait(lambda d: env.css("h1 .status.cancelled"), timeout=60, what="the job cancelled")
    assert api.get(f"/train/{job['job_id']}").json()["status"] == "cancelled"
    env.no_errors()


# --- adapters ---------------------------------------------------------------------------------------


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What a browser does when files are dropped: a drop event whose DataTransfer holds them.
DROP_JS = """
const [zone, files] = arguments;
const dt = new DataTransfer();
for (const [name, b64] of Object.entries(files)) {
  dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
}
zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def test_adapters_lists_uploads_and_deletes(env: Env, demo_job: str, api: httpx.Client) -> None:
    info = api.get("/adapters/demo").json()
    env.open("#/adapters", "tr[data-adapter='demo']")
    row = env.css("tr[data-adapter='demo']")[0]
    assert f"r {info['rank']}" in row.text and info["sha256"][:12] in row.text
    assert ("loaded" if info["loaded"] else "not loaded") in row.text
    env.shot("adapters")

    # Upload the demo adapter's two files under a new name, dropped together on the drop zone.
    folder = env.root / "adapters" / "demo"
    env.css("#upload-name")[0].send_keys("demo-copy")
    files = {f: base64.b64encode((folder / f).read_bytes()).decode() for f in ADAPTER_FILES}
    env.driver.execute_script(DROP_JS, env.css("#upload-drop")[0], files)
    assert "adapter_model.safetensors" in env.css("#upload-drop")[0].text  # the zone names what it got
    env.css("#upload")[0].click()
    env.wait(lambda d: env.css("tr[data-adapter='demo-copy']"), what="the uploaded adapter")
    assert api.get("/adapters/demo-copy").json()["sha256"] == info["sha256"]

    env.css("tr[data-adapter='demo-copy'] button.danger")[0].click()
    env.driver.switch_to.alert.accept()
    env.wait(lambda d: not env.css("tr[data-adapter='demo-copy']"), what="the adapter gone")
    assert api.get("/adapters/demo-copy").status_code == 404
    env.no_errors()


# --- playground -------------------------------------------------------------------------------------

# Records each answer's text length at every DOM change: a streamed answer grows in several steps.
WATCH_JS = """
window.__growth = {};
for (const card of document.querySelectorAll('.answer-card')) {
  const col = card.dataset.column, out = card.querySelector('.out');
  window.__growth[col] = [];
  new MutationObserver(() => window.__growth[col].push(out.textContent.length))
    .observe(out, {childList: true, subtree: true, characterData: true});
}
"""
MAX_TOKENS = 16  # the demo answer is 13 tokens + EOS
TEXT_JS = """
return Array.from(arguments[0].childNodes).filter((n) => !(n.classList && n.classList.contains('eos')))
  .map((n) => n.textContent).join('');
"""


def test_the_playground_streams_base_adapter_and_composition_side_by_side(
    env: Env, demo_job: str, api: httpx.Client
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    env.open("#/playground?adapter=demo", "#generate")
    env.css("#add-column")[0].click()
    third = env.css(".answer-card[data-column='2']")[0]
    Select(third.find_element("css selector", "select")).select_by_value("__composition")
    third.find_element("css selector", "input").send_keys("demo:0.5")
    max_tokens = env.css("#max-tokens")[0]
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    env.driver.execute_script(WATCH_JS)
    env.css("#generate")[0].click()
    env.wait(
        lambda d: all(c.get_attribute("data-state") == "done" for c in env.css(".answer-card")),
        timeout=120,
        what="three finished answers",
    )
    # The same requests, not streamed, through the API (at once: they share batches as the page's did).
    targets = {"base": {}, "1": {"adapter": "demo"}, "2": {"adapters": [{"name": "demo", "weight": 0.5}]}}
    ask = {"prompt": "Tell me a joke.", "max_new_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5}
    with ThreadPoolExecutor(len(targets)) as pool:
        replies = pool.map(lambda t: api.post("/generate", json={**ask, **t}).json(), targets.values())
        answers = dict(zip(targets, replies, strict=True))
    growth = env.driver.execute_script("return window.__growth")
    for column, want in answers.items():
        card = env.css(f".answer-card[data-column='{column}']")[0]
        out = card.find_element("css selector", ".out")
        assert env.driver.execute_script(TEXT_JS, out) == want["text"], column
        assert card.get_attribute("data-finish") == want["finish_reason"]
        # every token (EOS included) in a span with its log-probability (a token holding part of a
        # character shares the span of the token that completes it)
        shown = [
            float(v)
            for s in out.find_elements("css selector", ".tok")
            for v in s.get_attribute("data-logprobs").split()
        ]
        assert shown == pytest.approx([t["logprob"] for t in want["tokens"]], abs=1e-3) and shown
    assert SENTENCE in env.css(".answer-card[data-column='1'] .out")[0].text  # the demo adapter learned it
    # streamed: the base answer (no EOS on random weights) grew in more than one step
    assert len(set(growth["base"])) > 1, growth["base"]

    # hover a token: its log-probability and the alternatives
    token = env.css(".answer-card[data-column='1'] .tok")[0]
    ActionChains(env.driver).move_to_element(token).perform()
    tip = env.css("#tok-tip")[0]
    env.wait(lambda d: tip.is_displayed(), what="the token tooltip")
    assert f"logprob {float(token.get_attribute('data-logprob')):.3f}" in tip.text
    assert len(tip.find_elements("css selector", "tr")) == 5  # the top 5 alternatives
    env.shot("playground")
    # the keyboard reaches the same: focus the answer, arrow to a token
    out = env.css(".answer-card[data-column='1'] .out")[0]
    ActionChains(env.driver).move_by_offset(0, 300).perform()
    out.send_keys(Keys.ARROW_RIGHT)
    active = env.driver.switch_to.active_element
    assert "tok" in active.get_attribute("class") and tip.is_displayed()
    env.no_errors()


# --- every page: two viewports, labels, keyboard ----------------------------------------------------


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_every_page_fits_the_viewport_and_names_its_controls(env: Env, demo_job: str, viewport) -> None:
    pages = {"jobs": "#/jobs", "job": f"#/jobs/{demo_job}", "new": "#/new", "adapters": "#/adapters",
             "playground": "#/playground?adapter=demo"}  # fmt: skip
    env.browser.viewport(*viewport)
    try:
        for name, route in pages.items():
            env.open(route)
            time.sleep(0.5)  # tables and the chart fill after the heading
            env.shot(f"{name}-{viewport[0]}x{viewport[1]}")
            layout = env.browser.overflow()
            assert layout["scrollWidth"] <= layout["width"], (name, layout)
            assert layout["overflowing"] == [], (name, layout)
            assert env.browser.unlabelled_controls() == [], name
    finally:
        env.browser.viewport(*DESKTOP)
    env.no_errors()


def test_the_keyboard_reaches_every_section(env: Env, demo_job: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    env.open("#/jobs")
    d = env.driver
    d.refresh()  # a fresh load: focus starts at the top of the document
    env.wait(lambda d: env.css("main h1"), what="the jobs page")
    seen = []
    for _ in range(8):  # from the top: the skip link, the brand, the four sections…
        ActionChains(d).send_keys(Keys.TAB).perform()
        seen.append(d.switch_to.active_element.text)
        if seen[-1] == "Adapters":
            break
    assert seen[0] == "Skip to content", seen
    assert seen[-1] == "Adapters", seen
    d.switch_to.active_element.send_keys(Keys.ENTER)
    env.wait(lambda d: d.current_url.endswith("#/adapters"), what="the adapters page")
    env.wait(lambda d: d.switch_to.active_element.text == "Adapters", what="focus on the new page's heading")
    assert d.switch_to.active_element.tag_name == "h1"
    env.no_errors()
