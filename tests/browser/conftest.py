"""Browser fixtures: Debian's headless Chromium driven by Playwright (sync API) against the live server.

Chromium is the system package (`apt-get install chromium`, done by scripts/test.sh), never a
Playwright browser download. Without /usr/bin/chromium the browser tests skip, or fail under CI=true.
Screenshots of every page a test visits land in test-artifacts/screenshots/ at a desktop and a
phone width; a failing test also leaves a FAILED-* screenshot and the page's console log there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.apps.conftest import celery_worker_process, make_user  # noqa: F401 - the real worker, for the flow
from tests.conftest import IN_CI, ROOT

CHROMIUM = Path(os.environ.get("GRAFT_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
PASSWORD = "correct horse battery"
TIMEOUT_MS = 30_000  # any single action or expectation, unless a test says otherwise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)  # lets fixtures see, at teardown, whether the test failed
    return report


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """One headless Chromium for the session."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        why = f"no Chromium at {CHROMIUM} (scripts/test.sh installs Debian's `chromium` package)"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "the playwright package is not installed (pip install -r requirements-dev.txt)"
        pytest.fail(why) if IN_CI else pytest.skip(why)

    # Playwright's sync API keeps an asyncio loop on the main thread, which makes Django refuse ORM
    # calls from the test thread (user fixtures, the transactional DB flush) as "async-unsafe".
    # The test thread never shares a connection with the loop, so the check is lifted for the session.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()
    finally:
        # While that loop runs, asgiref files this thread's database connections apart from the
        # plain thread-local ones that pytest-django closes before dropping the test database:
        # close them here, or the drop fails with "database is being accessed by other users".
        from django.db import connections

        connections.close_all()
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def new_page(browser, request) -> Iterator[Callable]:
    """new_page(base_url=None) -> a Page in a fresh context (own cookies), 1280x900.

    Dialogs (confirm()) are accepted. Uncaught page errors collect in `page.js_errors`.
    """
    contexts, pages = [], []

    def make(base_url: str | None = None):
        context = browser.new_context(viewport=DESKTOP, base_url=base_url, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.js_errors = []
        page.console_lines = []
        page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
        page.on("console", lambda msg: page.console_lines.append(f"[{msg.type}] {msg.text}"))
        page.on("response", lambda r: r.status >= 400 and page.console_lines.append(f"[http {r.status}] {r.url}"))
        page.on("dialog", lambda dialog: dialog.accept())
        contexts.append(context)
        pages.append(page)
        return page

    yield make

    report = getattr(request.node, "rep_call", None)
    failed = report is not None and report.failed
    for i, page in enumerate(pages):
        if failed and not page.is_closed():
            _save_failure(page, f"{_slug(request.node.name)}-{i}")
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page, live_server):
    """A page whose relative URLs go to the live server: page.goto('/accounts/login/')."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return new_page(base_url=live_server.url)


@pytest.fixture(scope="session")
def shot() -> Callable:
    """shot(page, name): full-page screenshots at 1280x900 and 390x844 -> screenshots/<name>-1280.png, -390.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("FAILED-*"):
        old.unlink()

    def take(page, name: str) -> None:
        slug = _slug(name)
        try:
            for size in (DESKTOP, PHONE):
                page.set_viewport_size(size)
                _settle(page)
                page.screenshot(path=SCREENSHOTS / f"{slug}-{size['width']}.png", full_page=True, animations="disabled")
                # "Reads well at 390 px": nothing may stick out sideways, once layout has settled.
                try:
                    page.wait_for_function("document.documentElement.scrollWidth <= window.innerWidth", timeout=3000)
                except Exception:  # noqa: BLE001 - still too wide after 3 s: a real overflow, named below
                    overflow = page.evaluate(_OVERFLOW)
                    assert not overflow, f"{name} at {size['width']} px: wider than the screen: {overflow}"
        finally:
            page.set_viewport_size(DESKTOP)
            _settle(page)

    return take


def _settle(page) -> None:
    """Wait until a resize has settled: the page width and every canvas's size unchanged for 10
    frames in a row (Chart.js resizes its canvases from a ResizeObserver, frames after the
    viewport changed; a screenshot or a width check taken before that races it)."""
    page.evaluate(_STABLE_LAYOUT)


_STABLE_LAYOUT = """() => new Promise(resolve => {
  const signature = () => [document.documentElement.scrollWidth,
    ...[...document.querySelectorAll('canvas')].map(c => `${c.width}x${c.height}`)].join(',');
  let last = null, stable = 0, frames = 0;
  const tick = () => {
    const now = signature();
    stable = now === last ? stable + 1 : 0;
    last = now;
    if (stable >= 10 || ++frames > 300) resolve(); else requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})"""


_OVERFLOW = """() => document.documentElement.scrollWidth <= window.innerWidth ? [] :
  [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
    .slice(0, 5).map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`)"""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "page"


def _save_failure(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=SCREENSHOTS / f"FAILED-{name}.png", full_page=True, timeout=10_000)
    except Exception as exc:  # the page may be gone or hung; the log below still helps
        page.console_lines.append(f"(no failure screenshot: {exc})")
    lines = [f"url: {page.url}", *page.console_lines, *(f"[pageerror] {e}" for e in page.js_errors)]
    (SCREENSHOTS / f"FAILED-{name}.log").write_text("\n".join(lines) + "\n")


def sign_in(page, username: str, password: str = PASSWORD) -> None:
    """Through the login form, as a person would."""
    from playwright.sync_api import expect

    page.goto("/accounts/login/")
    page.locator("#id_username").fill(username)
    page.locator("#id_password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Your work")
