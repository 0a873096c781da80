"""The web page in a real browser: headless Chromium driven by Playwright.

Needs ``pip install playwright`` and a Chromium binary (Debian: ``apt-get install
chromium``; or set ``CHROMIUM``); skipped otherwise. Screenshots go to ``artifacts/``.
"""

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"Chromium not found (looked for $CHROMIUM, chromium, chromium-browser, {CHROMIUM}); "
        "install it (Debian: apt-get install chromium) to run the browser tests",
        allow_module_level=True,
    )

from deblurdiff.space import app as app_module  # noqa: E402
from deblurdiff.space.app import EXAMPLES_DIR, build_demo  # noqa: E402

from conftest import serve  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def dev_app(one_torch_thread, random_tiny_pipe):
    demo = build_demo(random_tiny_pipe, model_ref="random-tiny")
    yield serve(demo), demo.deblurdiff_app
    demo.close()


@pytest.fixture(scope="module")
def dev_url(dev_app):
    return dev_app[0]


@pytest.fixture(scope="module")
def no_weights_url():
    demo = build_demo(None)
    yield serve(demo)
    demo.close()


@pytest.fixture(scope="module")
def browser_context():
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="deblurdiff-chromium-") as profile:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
            )
        except Exception as exc:  # a Chromium that cannot start here
            pytest.skip(f"Chromium at {CHROMIUM} could not be started: {exc}")
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


def example_image() -> Path:
    images = sorted(EXAMPLES_DIR.glob("*.jpg"))
    if not images:
        pytest.skip("no example images in examples/")
    return images[0]


def set_steps(page, value: int):
    box = page.locator("#steps input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    sync_api.expect(box).to_have_value(str(value))


def wait_for_result(page):
    sync_api.expect(page.locator("#result img")).to_have_count(2, timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#result-info")).to_contain_text("Done in", timeout=TIMEOUT_MS)


def screenshot(page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_upload_and_run(page, dev_url):
    page.goto(dev_url)
    sync_api.expect(page.locator("#model-status")).to_contain_text("UNTRAINED development weights")
    set_steps(page, 2)
    image = example_image()
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    sync_api.expect(page.locator("#input-info")).to_contain_text("Input: ")
    sync_api.expect(page.locator("#input-info")).to_contain_text("Estimated time")
    page.locator("#run-button").click()
    wait_for_result(page)
    sync_api.expect(page.locator("#result-info")).to_contain_text("UNTRAINED")
    sync_api.expect(page.locator("#result-info")).to_contain_text("2 steps")
    sync_api.expect(page.locator("#download a").first).to_have_attribute("href", re.compile(rf"/{image.stem}_deblurred_UNTRAINED\.png$"))
    screenshot(page, "browser-upload-and-run.png")


def test_clicking_an_example_runs_it(page, dev_url):
    page.goto(dev_url)
    set_steps(page, 1)
    examples = page.locator("#examples button.gallery-item")
    sync_api.expect(examples.first).to_be_visible()
    examples.first.click()
    wait_for_result(page)
    sync_api.expect(page.locator("#result-info")).to_contain_text("1 step,")
    sync_api.expect(page.locator("#input-info")).to_contain_text("Input: ")
    screenshot(page, "browser-example.png")


def test_cancel_stops_the_run(page, dev_app, monkeypatch):
    url, app = dev_app
    assert app.speed_ready.wait(60)  # the start-up speed probe holds the model too
    runs = []

    def recording_restore(*args, **kwargs):
        runs.append(real_restore(*args, **kwargs))
        return runs[-1]

    real_restore = app_module.restore
    monkeypatch.setattr(app_module, "restore", recording_restore)
    page.goto(url)
    set_steps(page, 100)
    page.locator("#input-image input[type=file]").set_input_files(str(example_image()))
    sync_api.expect(page.locator("#input-info")).to_contain_text("Input: ")
    page.locator("#run-button").click()
    sync_api.expect(page.locator("#result .progress-text, #result .meta-text, #result .progress-level")).not_to_have_count(0)
    deadline = time.monotonic() + 30
    while not app.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.lock.locked(), "the run did not start"
    page.locator("#cancel-button").click()
    sync_api.expect(page.locator("#result-info")).to_contain_text("Cancelled.")
    # The pipeline stops after its current step instead of finishing 100 of them.
    deadline = time.monotonic() + 10
    while app.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not app.lock.locked(), "the pipeline kept running after Cancel"
    assert len(runs) == 1 and runs[0].interrupted
    sync_api.expect(page.locator("#result img")).to_have_count(0)


def test_without_weights_the_page_says_what_is_missing(page, no_weights_url):
    page.goto(no_weights_url)
    status = page.locator("#model-status")
    sync_api.expect(status).to_contain_text("No model weights are loaded")
    sync_api.expect(status).to_contain_text("DEBLURDIFF_MODEL")
    screenshot(page, "browser-no-weights.png")
    page.locator("#input-image input[type=file]").set_input_files(str(example_image()))
    sync_api.expect(page.locator("#input-info")).to_contain_text("Input: ")
    page.locator("#run-button").click()
    sync_api.expect(page.get_by_text("No DeblurDiff weights are configured").last).to_be_visible()
    sync_api.expect(page.locator("#result img")).to_have_count(0)
    screenshot(page, "browser-no-weights-run.png")
