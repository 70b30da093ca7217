"""The explorer pages (paperlib.explorer: the meta-SAE page and the consistency explorer) in a real headless Chromium.

tests/test_family.py checks the HTML text; only a browser runs the page's inline script. Here
playwright (PyPI) drives Debian's ``chromium`` (``make test`` installs it when it can, see the
Makefile's ``browser`` target): the list, the search box, selecting a latent, following a
meta-latent and back, text from the data staying text, and no console or page error on the way.
Without chromium or playwright the tests skip; with PAPERLIB_REQUIRE_BROWSER=1 (.ci/run) they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from paperlib.explorer import write_explorer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

TITLE, NOTES = "Explorer <test>", "two SAEs & a meta-SAE"
# Text that would run script if the page ever inserted data as HTML: each sets window.__pwned.
IMG = '<img src=x onerror="window.__pwned = 1">'
SCRIPT = "<script>window.__pwned = 2</script>"

LATENTS: list[dict[str, Any]] = [
    {
        "id": 3,
        "label": "Paris",
        "frequency": 0.01,
        "contexts": ["flew to «Paris» today", "in «Paris»</script><b>x</b>"],
        "parts": [[0, 0.5], [1, 0.25]],
        "cosine": 0.9,
        "tags": ["example"],
        "neighbours": [{"sae": "288", "latent": 7, "cos": 0.8, "label": "France"}],
    },
    {"id": 5, "label": "the", "frequency": 0.2, "contexts": [f"{IMG} «the» end"], "parts": [[1, 0.75]]},
    {
        "id": 12,
        "label": "Rome",
        "frequency": 0.005,
        "contexts": [f"«Rome» wasn't {SCRIPT} built"],
        "parts": [[0, 0.4]],
        "tags": ["city"],
    },
    {"id": 40, "label": "<i>of</i>", "frequency": 0.125, "contexts": []},
]
META: dict[int, dict[str, Any]] = {
    0: {
        "label": "cities",
        "frequency": 0.02,
        "members": [[3, 0.5, "Paris"], [12, 0.4, "Rome"], [99, 0.1, "gone"]],
        "neighbours": [{"sae": "1536", "latent": 21, "cos": 0.7, "label": "capitals"}],
    },
    1: {"label": "<u>function words</u>", "frequency": 0.5, "members": [[5, 0.75, "the"], [3, 0.25, "Paris"]]},
}
# What the page's list shows for LATENTS: "id · label · frequency as a percentage, 3 significant digits".
ENTRIES = ["3 · Paris · 1.00%", "5 · the · 20.0%", "12 · Rome · 0.500%", "40 · <i>of</i> · 12.5%"]


def _unavailable(reason: str) -> NoReturn:
    """Skip, unless PAPERLIB_REQUIRE_BROWSER=1 (set by .ci/run): there a silent skip would hide the test."""
    if os.environ.get("PAPERLIB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and PAPERLIB_REQUIRE_BROWSER=1 says this browser test must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Debian Chromium for the module (playwright's own browser download cannot be used here)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("no playwright package: make browser installs it (pip install -e '.[browser]')")
    chromium = shutil.which("chromium")
    if chromium is None:
        _unavailable("no chromium on PATH: make browser installs it as root (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


def _open(browser: Browser, path: Path, errors: list[str]) -> Page:
    """Open ``path`` in a fresh page that records console errors, page errors and every URL it loads."""
    page = browser.new_page()
    page.set_default_timeout(10_000)
    page.on("console", lambda msg: errors.append(f"console error: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("request", lambda req: None if req.url == path.as_uri() else errors.append(f"loaded {req.url}"))
    page.goto(path.as_uri())
    return page


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    """The explorer page of LATENTS and META; afterwards nothing may have logged an error, run injected
    script or loaded anything but the page itself (it promises to be self-contained)."""
    path = write_explorer(tmp_path / "explorer.html", TITLE, NOTES, LATENTS, meta_latents=META)
    errors: list[str] = []
    page = _open(browser, path, errors)
    yield page
    pwned = page.evaluate("window.__pwned")
    page.close()
    assert pwned is None, "text from the data ran as script"
    assert errors == []


def _entries(page: Page) -> list[str]:
    """The latent list's entries, as shown."""
    return page.locator("#list > div").all_inner_texts()


def _heading(page: Page) -> tuple[str, list[str]]:
    """The main pane's h1: its own text, and its tags (shown as labels after it)."""
    h1 = page.locator("#main h1")
    return h1.evaluate("h => h.firstChild.textContent"), h1.locator(".tag").all_inner_texts()


def _rows(page: Page, heading: str) -> list[list[str]]:
    """The rows of the table under the h2 ``heading`` in the main pane, cell texts, header row left out."""
    table = page.locator(f"#main h2:text-is('{heading}') + table")
    return [row.locator("td").all_inner_texts() for row in table.locator("tr").all()[1:]]


def _selected(page: Page) -> list[str]:
    """The list entries highlighted as the latent shown."""
    return page.locator("#list > div.on").all_inner_texts()


def test_page_renders_the_list_and_the_first_latent(page: Page) -> None:
    """On opening: the title and notes, every latent in the list, and the first one shown and highlighted."""
    assert page.title() == TITLE
    assert page.locator("#side .note").inner_text() == NOTES
    assert _entries(page) == ENTRIES
    assert _heading(page) == ("latent 3: Paris", ["example"])
    assert _selected(page) == [ENTRIES[0]]


def test_search_filters_the_list(page: Page) -> None:
    """The search box is how one finds a latent among thousands: it must narrow the list and restore it."""
    box = page.locator("#filter")
    assert len(_entries(page)) == 4
    box.press_sequentially("pa")  # typed key by key: the list follows each keystroke
    assert _entries(page) == [ENTRIES[0]]
    box.fill("ROME")  # case-insensitive, on the label
    assert _entries(page) == [ENTRIES[2]]
    box.fill("city")  # on a tag
    assert _entries(page) == [ENTRIES[2]]
    box.fill("40")  # on the id
    assert _entries(page) == [ENTRIES[3]]
    box.fill("<i>")  # markup in a label is text to search, not HTML
    assert _entries(page) == [ENTRIES[3]]
    box.fill("no latent has this")
    assert _entries(page) == []
    assert _heading(page)[0] == "latent 3: Paris"  # filtering leaves the view alone
    box.fill("")
    assert _entries(page) == ENTRIES
    assert _selected(page) == [ENTRIES[0]]  # and the latent shown stays highlighted after a redraw


def test_selecting_a_latent_shows_its_details(page: Page) -> None:
    """A click on a list entry shows that latent: frequency, cosine, meta-latents, contexts, neighbours."""
    page.locator("#list > div", has_text="5 · the").click()
    main = page.locator("#main")
    assert _heading(page) == ("latent 5: the", [])
    assert _selected(page) == [ENTRIES[1]]
    assert main.locator(".note").inner_text() == "fires on 20.0% of held-out tokens"  # no cosine given
    assert main.locator(".ctx").all_inner_texts() == [f"{IMG} the end"]
    assert main.locator(".ctx mark").all_inner_texts() == ["the"]  # the activating token, between « and »
    assert _rows(page, "decomposition into meta-latents") == [
        ["#1", "0.750", "<u>function words</u>", "50.0% of latents"]
    ]
    assert main.locator("h2").all_inner_texts() == ["decomposition into meta-latents", "top contexts (held-out tokens)"]

    page.locator("#filter").fill("a")  # select from a filtered list
    page.locator("#list > div", has_text="3 · Paris").click()
    assert _heading(page) == ("latent 3: Paris", ["example"])
    assert main.locator(".note").inner_text() == (
        "fires on 1.00% of held-out tokens; meta-SAE reconstruction cosine 0.900"
    )
    assert main.locator(".ctx").all_inner_texts() == ["flew to Paris today", "in Paris</script><b>x</b>"]
    assert main.locator(".ctx mark").all_inner_texts() == ["Paris", "Paris"]
    assert _rows(page, "decomposition into meta-latents") == [
        ["#0", "0.500", "cities", "2.00% of latents"],
        ["#1", "0.250", "<u>function words</u>", "50.0% of latents"],
    ]
    assert _rows(page, "nearest latents in other SAEs (decoder cosine)") == [["288", "7", "0.800", "France"]]

    page.locator("#filter").fill("")
    page.locator("#list > div", has_text="40 · ").click()  # no parts, no contexts, no neighbours: no sections
    assert _heading(page) == ("latent 40: <i>of</i>", [])
    assert main.locator("h2").all_inner_texts() == []
    assert main.locator(".ctx").count() == 0


def test_meta_latent_shows_the_latents_that_use_it(page: Page) -> None:
    """A meta-latent link shows its members, and a member link leads back to that latent (paper B's browsing)."""
    main = page.locator("#main")
    main.locator("a", has_text="#0").click()  # from latent 3, shown first
    assert _heading(page) == ("meta-latent 0: cities", [])
    assert main.locator(".note").inner_text() == "fires on 2.00% of the latents"
    assert _rows(page, "latents that use it most") == [
        ["3", "0.500", "Paris"],
        ["12", "0.400", "Rome"],
        ["99", "0.100", "gone"],
    ]
    assert main.locator("td a").all_inner_texts() == ["3", "12"]  # 99 is not on the page: plain text, no link
    assert _rows(page, "nearest latents of SAEs (decoder cosine)") == [["1536", "21", "0.700", "capitals"]]

    main.locator("td a", has_text="12").click()  # follow a member: latent 12, highlighted in the list
    assert _heading(page) == ("latent 12: Rome", ["city"])
    assert _selected(page) == [ENTRIES[2]]
    assert main.locator(".ctx").all_inner_texts() == [f"Rome wasn't {SCRIPT} built"]

    main.locator("a", has_text="#0").click()  # and back to the same meta-latent from latent 12
    assert _heading(page) == ("meta-latent 0: cities", [])
    page.locator("#list > div", has_text="5 · the").click()
    main.locator("a", has_text="#1").click()
    assert _heading(page) == ("meta-latent 1: <u>function words</u>", [])
    assert _rows(page, "latents that use it most") == [["5", "0.750", "the"], ["3", "0.250", "Paris"]]
    assert main.locator("h2").all_inner_texts() == ["latents that use it most"]  # no neighbours given


def test_text_from_the_data_is_never_markup(page: Page) -> None:
    """Contexts are web text: markup in them must show as text on every view, never become elements."""
    for entry in ("5 · the", "12 · Rome", "40 · ", "3 · Paris"):
        page.locator("#list > div", has_text=entry).click()
        assert page.locator("#main img, #main script, #main b, #main i").count() == 0
    page.locator("#main a", has_text="#1").click()
    assert page.locator("#main u").count() == 0
    assert page.locator("body img, body i, body u").count() == 0
    # window.__pwned unset and no request for "x" are checked when the page fixture closes


def test_comment_and_script_tags_in_data_leave_the_page_working(browser: Browser, tmp_path: Path) -> None:
    """ "<!--<script>" in the inline JSON once made the HTML parser swallow the page's own script: a blank page."""
    latents = [
        {"id": 1, "label": "<!--<script>", "frequency": 0.5, "contexts": ["a <!-- «b» <script> c"]},
        {"id": 2, "label": "</script> <!--", "frequency": 0.25, "contexts": []},
    ]  # no "-->": it ends the swallow
    path = write_explorer(tmp_path / "comment.html", "<!--", "<script>", latents)
    errors: list[str] = []
    page = _open(browser, path, errors)
    assert page.title() == "<!--"
    assert _entries(page) == ["1 · <!--<script> · 50.0%", "2 · </script> <!-- · 25.0%"]
    assert page.locator("#main .ctx").inner_text() == "a <!-- b <script> c"
    page.locator("#list > div", has_text="2 · ").click()
    assert _heading(page) == ("latent 2: </script> <!--", [])
    page.close()
    assert errors == []


# ------------------------------------------------------------------ the consistency explorer
def test_consistency_explorer_lists_stable_latents_first_with_their_partners(browser: Browser, tmp_path: Path) -> None:
    """The page `paperlib consistency ... --html` writes: three runs that share 12 of their atoms (the
    runs of tests/test_consistency_json.py). The shared latents come first, tagged stable, each with
    its partner in both other runs; the run's own latents are last and flagged below chance; a
    selected latent shows its partners and says its firing frequency is unknown (decoder only)."""
    from paperlib.__main__ import main
    from test_consistency_json import runs as make_runs

    runs = make_runs.__wrapped__(tmp_path)
    out = tmp_path / "consistency.html"
    assert main(["consistency", *runs, "--html", str(out), "--chance-samples", "2"]) == 0
    errors: list[str] = []
    page = _open(browser, out, errors)
    entries = _entries(page)
    assert len(entries) == 20
    assert page.title() == "Consistency of 3 SAE runs" and "PW-MCC" in page.locator("#side .note").inner_text()
    stable = page.locator("#filter")
    stable.fill("stable")
    assert len(_entries(page)) == 12  # the shared atoms, and only they
    stable.fill("below chance")
    flagged = _entries(page)
    assert 1 <= len(flagged) <= 8 and all(e in entries[12:] for e in flagged)
    stable.fill("")
    page.locator("#list > div").nth(0).click()
    title, tags = _heading(page)
    assert tags == ["stable"] and title.startswith("latent ")
    partners = _rows(page, "matched partner in each other run (decoder cosine)")
    assert [row[0] for row in partners] == [f"[2] {runs[1]}", f"[3] {runs[2]}"]
    assert all(float(row[2]) > 0.9 and row[3] == "reappears" for row in partners)
    assert "firing frequency not known" in page.locator("#main .note").inner_text()
    page.close()
    assert errors == []
