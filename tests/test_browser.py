"""The course in a real browser: `labkit jupyter` serves lab 06, headless Chromium (Debian's, driven by
Playwright; no browser is downloaded) runs its cells, clicks the step widget through `docker run` and back,
and restarts the kernel mid-sequence. The target's state is checked from here after each click, and every
step is photographed into test-artifacts/browser/ (kept after the run)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from labkit.wire.errors import NotFound

from conftest import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.path.join(REPO, "test-artifacts", "browser")
NAME = "lk-step-six"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(lab):
    try:
        return lab.container(NAME).status
    except NotFound:
        return None


@pytest.fixture
def course(tmp_path):
    """Lab 06 up to its step widget (the rest of it would run the lab's own clean-up after the widget)."""
    with open(os.path.join(REPO, "notebooks", "06-mini-docker.ipynb"), encoding="utf-8") as f:
        nb = json.load(f)
    at = next(i for i, c in enumerate(nb["cells"]) if c["id"] == "06-05b")
    nb["cells"] = nb["cells"][:at + 1]
    for c in nb["cells"]:
        if "parameters" in c["metadata"].get("tags", []):
            c["source"] = "target = 'local'\nstudent_id = 'lecturer'\nquick = True\noutput_dir = None\n"
    d = tmp_path / "course"
    d.mkdir()
    (d / "06-mini-docker.ipynb").write_text(json.dumps(nb))
    return d


@pytest.fixture
def jupyter(course):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "jupyter", "--dir", str(course), "--port", str(port),
                             "--target", "local", "--big-screen"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=REPO)
    try:
        url = [proc.stdout.readline(), proc.stdout.readline()][1].strip()
        assert "token=" in url, url
        yield url.replace("/lab?", "/lab/tree/06-mini-docker.ipynb?")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the server shuts its kernels down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _remove_first(lab):
    """The lab's own exercise container (the notebook is cut before its clean-up cell) and what else it left."""
    try:
        lab.container("first").rm(force=True)
    except NotFound:
        pass
    lab.cleanup()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh --dev installs it)")
def test_a_lecturer_clicks_through_docker_run_in_a_real_browser(jupyter, lab):
    from playwright.sync_api import expect, sync_playwright
    _remove_first(lab)
    os.makedirs(SHOTS, exist_ok=True)
    for old in os.listdir(SHOTS):
        os.unlink(os.path.join(SHOTS, old))
    shots = []

    def shot(page, name):
        path = os.path.join(SHOTS, f"{len(shots):02d}-{name}.png")
        page.screenshot(path=path, full_page=False)
        shots.append(path)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(jupyter)
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab asks about its news once
            if news.count():
                news.first.click()
            # the kernel first: cells sent while it still starts may be lost on a loaded machine
            expect(page.get_by_text(re.compile(r"\| Idle")).first).to_be_visible(timeout=180_000)
            page.get_by_role("menuitem", name="Run").first.click()
            page.get_by_text("Run All Cells", exact=True).click()
            widget = page.locator(".labkit-steps")
            deadline = time.monotonic() + 180  # JupyterLab renders only the cells in view: follow the last one
            while not widget.count() and time.monotonic() < deadline:
                page.locator(".jp-NotebookPanel .jp-WindowedPanel-outer").first.evaluate(
                    "e => { e.scrollTop = e.scrollHeight; }")
                time.sleep(0.5)
            if not widget.count():  # say why: the page as it is, and every error a cell printed
                shot(page, "no-widget")
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                pytest.fail("the step widget did not appear; cell errors: "
                            + " | ".join(errors.nth(i).inner_text()[-600:] for i in range(errors.count())))
            widget.wait_for(timeout=30_000)
            widget.scroll_into_view_if_needed()
            expect(widget.get_by_text("step 0 of 4")).to_be_visible(timeout=30_000)
            shot(page, "ready")
            assert _state(lab) is None, "nothing is made before the first Next"
            nxt = widget.get_by_role("button", name="Next ▶")
            for i in range(1, 5):
                nxt.click()
                expect(widget.get_by_text(f"step {i} of 4")).to_be_visible(timeout=60_000)
                if i > 1:  # the image step shows the image; every later one its commands and system calls
                    expect(widget.locator(".labkit-record")).to_be_visible()
                shot(page, f"next-{i}")
                if i == 3:
                    assert _state(lab) == "created", "create made the container, nothing runs yet"
            assert _state(lab) == "running", "after start the container runs"
            expect(widget.get_by_text("running").first).to_be_visible()
            widget.get_by_role("button", name="◀ Back").click()
            expect(widget.get_by_text("step 3 of 4")).to_be_visible(timeout=60_000)
            shot(page, "back")
            assert _state(lab) not in ("running", None), "Back from start stopped its process; the container stays"
            # a restart mid-sequence: the kernel's exit undoes what the sequence made
            page.get_by_role("menuitem", name="Kernel").first.click()
            page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel")).first.click()
            page.locator(".jp-Dialog .jp-mod-accept").click()  # "Restart"
            deadline = time.monotonic() + 60
            while _state(lab) is not None and time.monotonic() < deadline:
                time.sleep(0.5)
            shot(page, "restarted")
            assert _state(lab) is None, "restarting the kernel left nothing of the sequence"
        finally:
            browser.close()
            _remove_first(lab)
    assert len(shots) == 7 and all(os.path.getsize(s) > 10_000 for s in shots), "the screenshots are kept"
    print("\nscreenshots:", *shots, sep="\n  ")
