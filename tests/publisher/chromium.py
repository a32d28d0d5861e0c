"""Load a page in Debian's real headless Chromium: the rendered DOM, or a screenshot.

Reusable by any test that serves the dashboard (unit tests here, the end-to-end rollout test). Each
call starts a fresh browser with a throw-away profile and every network feature that would call out
(component updates, sync, QUIC probes) turned off, so a page can only reach the server it names.
``--virtual-time-budget`` lets the page's timers (the dashboard polls every 2 s) run for that much
virtual time before the DOM is dumped, without the test sleeping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in CI, where Chromium refuses its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def chromium_path() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    for candidate in CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def require_chromium() -> str:
    """The Chromium binary; skips the calling test with the reason when it is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip(
            "headless Chromium not installed (Debian package 'chromium'; scripts/ensure-system-packages)"
        )
    return path


def _run(url: str, extra: list[str], budget_ms: int, timeout: float) -> subprocess.CompletedProcess[str]:
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="fleetbus-chromium-") as profile:
        args = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(url: str, *, budget_ms: int = 5000, timeout: float = 90.0) -> str:
    """The page's DOM after ``budget_ms`` of virtual time, serialized as HTML."""
    proc = _run(url, ["--dump-dom"], budget_ms, timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise AssertionError(f"chromium failed ({proc.returncode}) on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def screenshot(
    url: str,
    path: str | Path,
    *,
    size: tuple[int, int] = (1280, 900),
    budget_ms: int = 5000,
    timeout: float = 90.0,
) -> Path:
    """A PNG of the page at ``size`` after ``budget_ms`` of virtual time."""
    path = Path(path)
    proc = _run(url, [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], budget_ms, timeout)
    if proc.returncode != 0 or not path.is_file():
        raise AssertionError(
            f"chromium took no screenshot ({proc.returncode}) of {url}: {proc.stderr[-2000:]}"
        )
    return path


class Element:
    """One element of a parsed DOM: tag, attributes, children and text."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element] = []
        self.texts: list[str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        """All text inside, whitespace collapsed."""
        parts = list(self.texts)
        for child in self.children:
            parts.append(child.text)
        return " ".join(" ".join(parts).split())

    def iter(self) -> list[Element]:
        out: list[Element] = [self]
        for child in self.children:
            out.extend(child.iter())
        return out

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Element]:
        """Descendants matching a tag, a class and ``data_x="v"`` style attributes (``_`` for ``-``)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            e
            for e in self.iter()[1:]
            if (tag is None or e.tag == tag)
            and (cls is None or cls in e.classes)
            and all(e.attrs.get(k) == v for k, v in wanted.items())
        ]

    def by_id(self, element_id: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == element_id]
        assert found, f"no element with id {element_id!r}"
        return found[0]


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in _VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.texts.append(data)


def parse_dom(html: str) -> Element:
    """A small element tree of ``html`` for assertions (tag, class, data-* lookups)."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def load_dom(url: str, *, budget_ms: int = 5000) -> Element:
    """``dump_dom`` then ``parse_dom``: the rendered page, ready to query."""
    return parse_dom(dump_dom(url, budget_ms=budget_ms))
