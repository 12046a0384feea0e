"""The app in a real browser (headless Chromium through Playwright): pick a held-out sample,
generate, and see a face; a bad upload is a message in the page.

Skipped where no browser is installed: ``make test-browser`` installs Debian's Chromium and
runs this file. Playwright drives the system browser (``executable_path``), so nothing is
downloaded. Waits are hang guards, not speed checks: the shared CPU may be slow.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None
    or importlib.util.find_spec("playwright") is None
    or importlib.util.find_spec("gradio") is None,
    reason="needs chromium and playwright (make test-browser installs them)",
)

HANG_GUARD_MS = int(os.environ.get("APP_BROWSER_HANG_GUARD_MS", 600_000))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A launched app on a tiny run (127.0.0.1, a free port), closed at the end."""
    from controlnet_emo.app.engine import DEMO_CRITIC
    from controlnet_emo.app.ui import launch
    from tests.test_app import make_app_run

    run = make_app_run(tmp_path_factory.mktemp("browser"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = launch(str(run), port=port, critic=DEMO_CRITIC, device="cpu", prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1100})
            tab.set_default_timeout(HANG_GUARD_MS)
            tab.goto(app)
            tab.wait_for_selector("#gallery button.thumbnail-item")
            yield tab
        finally:
            browser.close()


def test_pick_a_held_out_sample_generate_and_see_a_face(page, tmp_path):
    page.get_by_label("Thumbnail 2 of 2").click()
    prompt = page.get_by_label("prompt", exact=True)
    page.wait_for_function(
        "el => el.value === 'a photo of a happy face'", arg=prompt.element_handle()
    )  # sample #1's own caption filled in
    page.click("#generate")
    face = page.wait_for_selector("#face img")
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=face)
    assert face.evaluate("el => el.naturalWidth") >= 256  # shown upscaled, not a thumbnail
    shot = np.asarray(Image.open(io.BytesIO(face.screenshot())).convert("RGB")).astype(int)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert shot.std() > 10 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank
    label = page.locator("#face").locator("xpath=following::*[contains(@class,'output-class')]")
    assert label.first.inner_text().strip()  # the critic's top expression is shown


def test_a_non_image_upload_is_a_message_in_the_page(page, tmp_path):
    bad = tmp_path / "render.png"
    bad.write_text("not a picture")
    page.get_by_role("tab", name="Upload").click()
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.click("#generate")
    toast = page.get_by_text("is not an image")
    toast.first.wait_for()
    assert "Traceback" not in page.content()
