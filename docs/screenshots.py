"""Screenshots of the two explorer pages for the README (``make screenshots``), in headless Chromium.

Opens ``09_meta_explorer.html`` and ``07_consistency_explorer.html`` of a profile's figures
(``paperlib.plotting.figures_dir``: ``figures/<profile>/`` unless PAPERLIB_FIGURES says otherwise;
written by notebooks 09 and 07), shows one latent on each, and saves ``docs/09_meta_explorer.png`` and
``docs/07_consistency_explorer.png``. A page that is missing is named with the command that writes it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"09_meta_explorer": "09_meta_saes", "07_consistency_explorer": "07_explanations"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="whose figures to photograph (default: default)")
    parser.add_argument("--latent", type=int, default=1, help="which list entry to show (0-based; default 1)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright  # make browser installs it

    from paperlib.plotting import figures_dir

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no chromium on PATH: run make browser (as root it installs Debian's chromium)")
    pages = {name: figures_dir(args.profile) / f"{name}.html" for name in PAGES}
    missing = [
        f"{path} (make figures PROFILE={args.profile} runs {PAGES[name]})"
        for name, path in pages.items()
        if not path.exists()
    ]
    if missing:
        sys.exit("missing explorer pages: " + "; ".join(missing))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        for name, path in pages.items():
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(path.as_uri())
            page.locator("#list > div").nth(args.latent).click()
            out = ROOT / "docs" / f"{name}.png"
            page.screenshot(path=out)
            print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e3:.0f} kB) from {path}")
            page.close()
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
