"""docs/screenshot.png: the app's page in headless Chromium (Playwright), as the README shows it.

The app runs with the tiny random development weights (its UNTRAINED banner is part of the
picture) and the first example photo chosen, so the input's size and the estimated run time
show; nothing is run.

    python scripts/make_screenshot.py [--out docs/screenshot.png]
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    args = parser.parse_args()
    import torch
    from playwright.sync_api import expect, sync_playwright

    from conftest import serve
    from deblurdiff.space.app import EXAMPLES_DIR, build_demo
    from deblurdiff.pipeline.loading import load_pipeline

    torch.set_num_threads(1)
    demo = build_demo(load_pipeline("random-tiny", device="cpu"), model_ref="random-tiny", measure_speed=False)
    url = serve(demo)
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, viewport={"width": 1280, "height": 900},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
            )
            page = context.new_page()
            page.goto(url)
            expect(page.locator("#scope")).to_contain_text("camera shake")
            page.locator("#input-image input[type=file]").set_input_files(str(sorted(EXAMPLES_DIR.glob("*.jpg"))[0]))
            expect(page.locator("#input-info")).to_contain_text("Estimated time", timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=args.out, full_page=True)
            context.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
