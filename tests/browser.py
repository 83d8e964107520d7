"""Pages as a user sees them: headless Chromium renders a URL or a local file, scripts run, and the
tests read the DOM it dumps. Test-only (tests/ is not packaged); `make chromium` installs Debian's
chromium. MLflow's UI is a React app, so its text exists only after the scripts have fetched the runs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

BINARIES = ("chromium", "chromium-browser")  # the names `make chromium` looks for
# what a browser shows no text of; <noscript> is raw text in the DOM of a page whose scripts ran
HIDDEN = {"script", "style", "noscript", "template", "head"}


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, BINARIES)), None)


@dataclass(frozen=True, slots=True)
class Page:
    url: str
    dom: str  # the DOM serialised after the scripts ran
    text: str  # its visible text, one space between text nodes
    images: list[str]  # the src of every <img>
    screenshot: Path | None


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []
        self.images: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        self.hidden += tag in HIDDEN

    def handle_endtag(self, tag: str) -> None:
        if tag in HIDDEN and self.hidden:
            self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.words += data.split()


def render(target: str | Path, *, screenshot: Path | None = None, budget_ms: int = 20_000,
           timeout_s: float = 120) -> Page:
    """Load `target` (a URL or a file), let its scripts run for `budget_ms` of virtual time (which
    stands still while requests are pending, so a slow server only costs wall time) and read the DOM.

    Raises FileNotFoundError without a chromium binary, TimeoutError past `timeout_s` of wall time
    (the whole browser process group is killed) and RuntimeError when Chromium fails."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError(f"none of {', '.join(BINARIES)} on PATH; `make chromium` installs it")
    url = Path(target).resolve().as_uri() if isinstance(target, Path) else target
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:  # no shared or left-over profile
        # no WebGL (MLflow's plots would draw it in software: CPU the text does not need), no traffic
        # of Chromium's own (nothing outside answers here)
        command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-3d-apis",
                   "--disable-background-networking", "--disable-component-update", "--no-first-run",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--window-size=1600,1200",
                   "--dump-dom", url]
        if screenshot is not None:
            command.insert(-1, f"--screenshot={screenshot}")
        # its own session: the renderer and GPU processes die with the browser on a timeout
        browser = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            dom, errors = browser.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.communicate()
            raise TimeoutError(f"chromium did not finish rendering {url} in {timeout_s:g} s "
                               f"(virtual time budget {budget_ms} ms)") from None
    if browser.returncode != 0 or not dom.strip():
        raise RuntimeError(f"chromium exited {browser.returncode} on {url} with no DOM:\n{errors[-3000:]}")
    reader = _Reader()
    reader.feed(dom)
    return Page(url, dom, " ".join(reader.words), reader.images, screenshot)


def assert_page_shows(target: str | Path, texts: Iterable[str], **render_kw) -> Page:
    """Render `target` and assert each text appears in its visible text (whitespace collapsed, so a
    table row reads as its cells' texts joined by single spaces). Returns the page for more checks."""
    page = render(target, **render_kw)
    missing = [text for text in texts if " ".join(text.split()) not in page.text]
    assert not missing, (f"{page.url} does not show {missing}; screenshot: {page.screenshot}; "
                         f"its text begins: {page.text[:2000]}")
    return page


def compare_runs_url(tracking_uri: str, run_ids: Iterable[str], experiment_ids: Iterable[str]) -> str:
    """MLflow's compare page (a hash route of the UI): both lists are JSON arrays in the query."""
    query = urlencode({"runs": json.dumps(list(run_ids)), "experiments": json.dumps(sorted(set(experiment_ids)))})
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?{query}"


def assert_compare_page_shows(tracking_uri: str, runs: Mapping[str, Mapping[str, object]], **render_kw) -> Page:
    """Render the compare page of `runs` (run id -> its expected params, at least one) and assert its
    parameter table has one row per param: the name, then each run's value in the order of `runs`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    url = compare_runs_url(tracking_uri, list(runs), (client.get_run(run_id).info.experiment_id for run_id in runs))
    names = list(dict.fromkeys(name for params in runs.values() for name in params))
    rows = [" ".join([name, *(str(p[name]) for p in runs.values() if name in p)]) for name in names]
    return assert_page_shows(url, [*runs, *rows], **render_kw)
