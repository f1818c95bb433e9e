"""Headless Chromium (Debian's ``chromium``) for the page tests, with every network request caught.

All of Chromium's traffic is sent to a local socket (``--proxy-server`` and ``--host-resolver-rules``
both point there) that records each connection and answers nothing, so a page that asks the network
for anything shows up in :meth:`Browser.page_requests`. Chromium itself still calls a few Google
services at start (time, component updates, accounts) despite the flags; those hosts are set apart.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars")
BROWSER_OWN = ("clients2.google.com", "update.googleapis.com", "accounts.google.com", ".gvt1.com")


def request_host(first_line: str) -> str:
    """The host a proxied request line asks for: ``GET http://h/x HTTP/1.1`` or ``CONNECT h:443 HTTP/1.1``."""
    parts = first_line.split()
    if len(parts) < 2:
        return ""
    target = parts[1]
    return (urlsplit(target).hostname if "://" in target else target.rsplit(":", 1)[0]) or ""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed: dev/setup_env.sh installs Debian's chromium"
    return found


class Browser:
    def __init__(self, profile_root: Path) -> None:
        self.profile_root = profile_root
        self.connections: list[bytes] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self._runs = 0

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.connections.append(conn.recv(4096))
            except OSError:
                self.connections.append(b"")
            finally:
                conn.close()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        self._runs += 1
        profile = self.profile_root / f"profile-{self._runs}"  # a fresh profile each time
        command = [chromium(), *FLAGS, f"--user-data-dir={profile}",
                   f"--proxy-server=http://127.0.0.1:{self.port}", "--proxy-bypass-list=<-loopback>",
                   f"--host-resolver-rules=MAP * 127.0.0.1:{self.port}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=90)

    def page_requests(self) -> list[str]:
        """Request lines seen, less Chromium's own background calls."""
        lines = [c.split(b"\r\n", 1)[0].decode("latin-1") for c in self.connections]
        return [line for line in lines
                if not any(request_host(line) == h or (h.startswith(".") and request_host(line).endswith(h))
                           for h in BROWSER_OWN)]

    def dom(self, page: Path) -> str:
        done = self._run("--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri())
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def screenshot(self, page: Path, target: Path, width: int = 412, height: int = 2400) -> Path:
        """A phone-width screenshot (412 px wide, a common phone's CSS width)."""
        done = self._run(f"--window-size={width},{height}", f"--screenshot={target}", page.resolve().as_uri())
        assert done.returncode == 0 and target.exists(), done.stderr[-2000:]
        return target

    def measure(self, page: Path, width: int, height: int = 2400) -> dict:
        """Layout figures of ``page`` as Chromium lays it out ``width`` CSS px wide: for every table its
        ``scrollWidth`` and ``clientWidth`` (clipped when the first is larger), for every chart text its font
        size in CSS px as drawn (SVG units times the chart's scale on screen), and each chart's texts.

        Headless Chromium will not make a window narrower than 500 px, so the page is loaded in an iframe of
        exactly ``width`` px (a viewport of its own, as a phone's). The page forbids scripts (its
        Content-Security-Policy), so what the iframe loads is a copy beside it without that policy and with a
        measuring script appended, which posts its figures to the wrapper; the page itself is not touched."""
        copy = page.with_name(f".measure-{width}-{page.name}")
        wrapper = page.with_name(f".measure-{width}-wrapper.html")
        text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
        copy.write_text(text.replace("</body>", f"<script>{_MEASURE_JS}</script></body>"))
        wrapper.write_text(
            f'<!DOCTYPE html><html><body style="margin:0"><iframe src="{copy.name}" width="{width}" '
            f'height="{height}" style="border:0"></iframe><script>{_RECEIVE_JS}</script></body></html>')
        try:
            done = self._run(f"--window-size={max(width, 500) + 40},{height}", "--virtual-time-budget=5000",
                             "--allow-file-access-from-files", "--dump-dom", wrapper.resolve().as_uri())
        finally:
            copy.unlink()
            wrapper.unlink()
        assert done.returncode == 0, done.stderr[-2000:]
        found = re.search(r'<pre id="ndop-measure">(.*?)</pre>', done.stdout, re.S)
        assert found, done.stdout[-2000:]
        return json.loads(html.unescape(found.group(1)))

    def close(self) -> None:
        self._server.close()


_MEASURE_JS = """
const out = {viewport: window.innerWidth, tables: [], chart_font_px: [], ticks: []};
for (const t of document.querySelectorAll('table')) {
  out.tables.push({scroll: t.scrollWidth, client: t.clientWidth});
}
for (const chart of document.querySelectorAll('.chart svg')) {
  const texts = [];
  for (const t of chart.querySelectorAll('text')) {
    const m = t.getScreenCTM();
    const size = parseFloat(getComputedStyle(t).fontSize) * Math.hypot(m.a, m.b);
    out.chart_font_px.push(Math.round(size * 100) / 100);
    texts.push(t.textContent);
  }
  out.ticks.push(texts);
}
const pre = document.createElement('pre');
pre.id = 'ndop-measure';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
parent.postMessage(pre.textContent, '*');
"""
_RECEIVE_JS = """
window.addEventListener('message', (event) => {
  const pre = document.createElement('pre');
  pre.id = 'ndop-measure';
  pre.textContent = event.data;
  document.body.appendChild(pre);
});
"""
