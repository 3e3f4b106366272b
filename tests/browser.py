"""Headless Chromium for tests and the README's screenshots: render a page, read its DOM.

The Ray dashboard is a single-page app, so plain HTTP only returns its empty shell; Chromium
runs its JavaScript and `--virtual-time-budget` lets it finish its API calls before the DOM is
dumped or the screenshot taken. Debian's package is `chromium` (`apt install chromium`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def _run(browser: str | None, args: list[str], url: str, budget_ms: int) -> str:
    browser = browser or find_chromium()
    if browser is None:
        raise RuntimeError("no headless Chromium (apt install chromium)")
    # A throwaway profile: no state from earlier runs, nothing left in the user's home.
    with tempfile.TemporaryDirectory(prefix="shoal-chromium-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", *args, url,
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=budget_ms / 1000 + 90, cwd=profile
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, *, budget_ms: int = 15000, browser: str | None = None) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of virtual time."""
    return _run(browser, ["--dump-dom"], url, budget_ms)


def dom_until(url: str, needles: list[str], timeout: float, *, budget_ms: int = 10000) -> str:
    """The rendered DOM of ``url`` once it holds every needle (or the last one at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        dom = dump_dom(url, budget_ms=budget_ms)
        if all(needle in dom for needle in needles) or time.monotonic() > deadline:
            return dom
        time.sleep(2.0)


def screenshot(
    url: str,
    out: Path,
    *,
    size: tuple[int, int] = (1400, 900),
    budget_ms: int = 15000,
    browser: str | None = None,
) -> Path:
    """A PNG of the page at ``size`` after its scripts ran for ``budget_ms`` of virtual time."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(browser, [f"--window-size={size[0]},{size[1]}", f"--screenshot={out}"], url, budget_ms)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out
