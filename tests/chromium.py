"""Open a page in headless Chromium and report what rendered: images, errors, console messages.

A copy of the page gets a small script at the top of <head> that records console.error calls,
script errors and resources that failed to load, and on `load` writes a JSON verdict into the
DOM (every <img> complete with naturalWidth > 0?). `--dump-dom` prints the DOM after load;
Chromium's own log (stderr) adds any console message the page printed.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom"]

PROBE = """<script>
window.__problems = [];
(function () {
  var err = console.error;
  console.error = function () { window.__problems.push('console.error: ' + Array.from(arguments).join(' ')); err.apply(console, arguments); };
  window.addEventListener('error', function (ev) {
    var t = ev.target;
    window.__problems.push(t && t.tagName ? 'failed to load <' + t.tagName.toLowerCase() + '>' : 'error: ' + ev.message);
  }, true);
  window.addEventListener('load', function () {
    var imgs = Array.from(document.images);
    var out = {images: imgs.length,
               rendered: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
               sizes: imgs.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
               problems: window.__problems};
    var pre = document.createElement('pre');
    pre.id = 'render-check';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def setup_installs_chromium() -> bool:
    """Whether scripts/setup.sh installs Chromium on this machine (root with apt on Debian, not
    opted out): there a missing browser is a broken set-up, not a reason to skip."""
    if os.environ.get("MPIDL_SKIP_CHROMIUM") == "1" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    try:
        return "ID=debian" in Path("/etc/os-release").read_text().splitlines()
    except OSError:
        return False


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(page: Path, work: Path, browser: str) -> dict:
    """{'images', 'rendered', 'sizes', 'problems', 'console'} for `page` (its copy lives in `work`)."""
    text = page.read_text()
    probed = re.sub(r"<head>", "<head>" + PROBE, text, count=1) if "<head>" in text else PROBE + text
    copy = work / ("probed-" + page.name)
    copy.write_text(probed)
    profile = work / "chromium-profile"
    profile.mkdir(exist_ok=True)
    p = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", copy.resolve().as_uri()], capture_output=True,
                       text=True, timeout=120)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', p.stdout, re.S)
    if not m:
        raise AssertionError(f"no render verdict in the DOM (exit {p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(html.unescape(m.group(1)))
    out["console"] = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    return out


GEOMETRY = """<script>
window.addEventListener('load', function () {
  var out = {height: window.innerHeight, width: window.innerWidth, boxes: {}};
  (window.__ids || []).forEach(function (id) {
    var el = document.getElementById(id);
    if (el) { var r = el.getBoundingClientRect(); out.boxes[id] = [r.top, r.bottom, r.left, r.right]; }
  });
  var pre = document.createElement('pre');
  pre.id = 'geometry-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def first_screen(page: Path, work: Path, browser: str, ids: list[str], size: tuple[int, int] = (1280, 800)) -> dict:
    """Where the elements with these ids sit when the page opens in a window of `size` (CSS pixels):
    {'height', 'width', 'boxes': {id: [top, bottom, left, right]}}; an id not found is left out."""
    text = page.read_text()
    probe = f"<script>window.__ids = {json.dumps(ids)};</script>" + GEOMETRY
    copy = work / ("geometry-" + page.name)
    copy.write_text(re.sub(r"<head>", "<head>" + probe, text, count=1) if "<head>" in text else probe + text)
    profile = work / "chromium-profile-geometry"
    profile.mkdir(exist_ok=True)
    p = subprocess.run([browser, *FLAGS, f"--window-size={size[0]},{size[1]}", "--hide-scrollbars",
                        f"--user-data-dir={profile}", copy.resolve().as_uri()], capture_output=True, text=True,
                       timeout=120)
    m = re.search(r'<pre id="geometry-check">(.*?)</pre>', p.stdout, re.S)
    if not m:
        raise AssertionError(f"no geometry in the DOM (exit {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(html.unescape(m.group(1)))
