"""A real headless browser for the web console's tests: Debian's Chromium driven by Selenium.

    with chromium() as browser:
        browser.viewport(1280, 800)
        browser.driver.get(url)
        browser.screenshot(path)

Chromium and ChromeDriver are Debian's packages (``make test`` installs them: the Makefile's
``test-tools``); Selenium talks to the system ChromeDriver, never one it downloads.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Every element whose box reaches past the viewport's right edge, unless an ancestor scrolls or clips
# it horizontally (a wide table in its own scroll box is fine; a page that scrolls sideways is not).
OVERFLOW_JS = """
const width = document.documentElement.clientWidth;
const clipped = (el) => {
  for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o === "auto" || o === "scroll" || o === "hidden") return true;
  }
  return false;
};
const out = [];
for (const el of document.body.querySelectorAll("*")) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) continue;
  if (r.right > width + 1 && !clipped(el))
    out.push(`${el.tagName.toLowerCase()}#${el.id}.${el.className} right=${Math.round(r.right)}`);
}
return {width, scrollWidth: document.documentElement.scrollWidth, overflowing: out.slice(0, 10)};
"""

# Form controls a person cannot name: no <label>, no aria-label(ledby).
UNLABELLED_JS = """
return Array.from(document.querySelectorAll("input, select, textarea, button"))
  .filter((el) => el.offsetParent !== null)
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                  && !el.getAttribute("aria-labelledby")
                  && !(el.tagName === "BUTTON" && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 120));
"""


@dataclass
class Browser:
    driver: object  # selenium.webdriver.Chrome

    def viewport(self, width: int, height: int) -> None:
        """The page's CSS viewport exactly (window sizes include browser chrome); narrow = mobile."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the viewport) as a PNG."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def overflow(self) -> dict:
        return self.driver.execute_script(OVERFLOW_JS)

    def unlabelled_controls(self) -> list[str]:
        return self.driver.execute_script(UNLABELLED_JS)

    def console_errors(self, ignore: tuple[str, ...] = ()) -> list[str]:
        """SEVERE browser log entries since the last call (JavaScript errors, CSP refusals, failed loads)."""
        entries = self.driver.get_log("browser")
        return [
            e["message"]
            for e in entries
            if e["level"] == "SEVERE" and not any(s in e["message"] for s in ignore)
        ]


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium; fails naming the Debian packages when they are not installed."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists() and not shutil.which(Path(p).name)]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: the console's browser tests need Debian's chromium and "
            "chromium-driver (apt-get install chromium chromium-driver; `make test` installs them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
