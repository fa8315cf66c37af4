"""Open the built site in headless Chromium and check that its pages render.

    sphinx-build -W -b html docs docs/_build/html
    python docs/check_site.py docs/_build/html --screenshots runs/site

For the index, one API page and the results page, Chromium loads the page inside a frame
of a small local wrapper page whose script reads the rendered document: its title, the
navigation links, the code blocks (with the highlighting style sheet applied), the images
(decoded, with a width) and the layout of the sidebar. The script's findings come back
through ``--dump-dom``; this program asserts on them and takes a screenshot of each page.
Nothing is fetched from the network. Exits non-zero, naming the page and the check, if
anything fails. CI runs it after building the site (``.ci/run``).
"""

from __future__ import annotations

import argparse
import html
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

# (page, what its body must contain besides the common checks)
PAGES = {
    "index.html": {"text": ["Dropout and batch normalisation for JAX"], "min_images": 2},
    "api/dropnorm.html": {"text": ["dropnorm.dropout", "Parameters", "Returns", "Raises"],
                          "ids": ["dropnorm.dropout", "dropnorm.batch_norm"], "min_images": 1},
    "results.html": {"text": ["Variance shift"], "min_images": 6, "code": False},
}

# Runs inside the wrapper page once the frame has loaded (same origin: both are file://
# URLs and Chromium runs with --allow-file-access-from-files).
PROBE = """
const frame = document.getElementById('page');
frame.addEventListener('load', () => {
  const d = frame.contentDocument, w = frame.contentWindow;
  const box = e => { if (!e) return null; const r = e.getBoundingClientRect();
                     return [r.left, r.top, r.width, r.height]; };
  const code = [...d.querySelectorAll('div.highlight pre')];
  const sidebar = d.querySelector('#pst-primary-sidebar, .bd-sidebar-primary');
  const report = {
    title: d.title,
    h1: (d.querySelector('h1') || {}).textContent || '',
    nav_links: [...d.querySelectorAll('nav.bd-docs-nav a, .bd-sidebar-primary nav a')]
                 .map(a => a.textContent.trim()),
    code_blocks: code.length,
    code_background: code.length ? w.getComputedStyle(code[0].parentElement).backgroundColor
                                 : null,
    highlighted_tokens: d.querySelectorAll('div.highlight pre span').length,
    images: [...d.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                     width: i.naturalWidth})),
    sidebar: box(sidebar),
    article: box(d.querySelector('.bd-article, article, main')),
    stylesheets: d.styleSheets.length,
    ids: [...d.querySelectorAll('[id]')].map(e => e.id),
    text: d.body.innerText,
  };
  document.getElementById('report').textContent = JSON.stringify(report);
});
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("check_site.py: no Chromium found; on Debian: apt-get install -y chromium")


def _run(browser: str, args: list[str]) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", "--window-size=1280,900", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"check_site.py: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def probe(browser: str, page: pathlib.Path, workdir: pathlib.Path) -> dict:
    wrapper = workdir / f"probe_{re.sub(r'[^a-z0-9]', '_', page.name)}.html"
    wrapper.write_text(
        '<!doctype html><html><body><pre id="report">no report</pre>'
        f'<iframe id="page" src="{page.as_uri()}" width="1280" height="900"></iframe>'
        f"<script>{PROBE}</script></body></html>")
    dom = _run(browser, ["--virtual-time-budget=10000", "--dump-dom", wrapper.as_uri()])
    m = re.search(r'<pre id="report">(.*?)</pre>', dom, re.S)
    if not m or m.group(1) == "no report":
        raise SystemExit(f"check_site.py: {page}: the page did not load in Chromium")
    return json.loads(html.unescape(m.group(1)))


def check(name: str, report: dict, expect: dict) -> list[str]:
    """The failed checks of one page (empty when it renders)."""
    bad = []
    if "dropnorm" not in report["title"] or not report["h1"].strip():
        bad.append(f"title {report['title']!r} / heading {report['h1']!r}")
    guides = {"Quickstart: the pure API", "Flax linen", "Flax NNX", "Scaling out",
              "API reference", "Results", "Speed and memory"}
    if not guides <= set(report["nav_links"]):
        bad.append(f"navigation lacks {sorted(guides - set(report['nav_links']))}")
    if expect.get("code", True):
        if report["code_blocks"] < 1 or report["highlighted_tokens"] < 5:
            bad.append(f"{report['code_blocks']} code blocks, "
                       f"{report['highlighted_tokens']} highlighted tokens")
        if report["code_background"] in (None, "rgba(0, 0, 0, 0)", "transparent"):
            bad.append(f"code block has no background ({report['code_background']}): no CSS")
    images = report["images"]
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    if len(images) < expect.get("min_images", 1) or broken:
        bad.append(f"{len(images)} images, not decoded: {broken}")
    # Laid out by the theme's CSS: a sidebar column at the left, the article beside it.
    sidebar, article = report["sidebar"], report["article"]
    if (not sidebar or not article or sidebar[0] > 50 or not 150 <= sidebar[2] <= 450
            or sidebar[3] < 400 or article[0] < sidebar[0] + sidebar[2] - 1):
        bad.append(f"no sidebar column with the article beside it: {sidebar}, {article}")
    for text in expect.get("text", []):
        if text not in report["text"]:
            bad.append(f"text {text!r} missing")
    for ident in expect.get("ids", []):
        if ident not in report["ids"]:
            bad.append(f"anchor {ident!r} missing")
    return [f"{name}: {b}" for b in bad]


def screenshot_is_drawn(path: pathlib.Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    n = len(colours) if colours else 1 << 20
    return None if n > 50 else f"{path.name}: only {n} colours (blank page?)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("site", nargs="?", default="docs/_build/html", help="the built site")
    p.add_argument("--screenshots", default=None, metavar="DIR",
                   help="keep a 1280x900 screenshot of each page here")
    args = p.parse_args(argv)
    site = pathlib.Path(args.site).resolve()
    browser = _chromium()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        shots = pathlib.Path(args.screenshots or tmp).resolve()
        shots.mkdir(parents=True, exist_ok=True)
        for name, expect in PAGES.items():
            page = site / name
            if not page.exists():
                failures.append(f"{name}: not built")
                continue
            report = probe(browser, page, pathlib.Path(tmp))
            failures += check(name, report, expect)
            shot = shots / (name.replace("/", "_").removesuffix(".html") + ".png")
            _run(browser, ["--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()])
            problem = screenshot_is_drawn(shot)
            if problem:
                failures.append(problem)
            print(f"{name}: title {report['title']!r}, {len(report['nav_links'])} navigation "
                  f"links, {report['code_blocks']} code blocks, {len(report['images'])} images "
                  f"(widths {[i['width'] for i in report['images']]}), screenshot {shot}")
    for f in failures:
        print("FAILED", f)
    print("site renders in Chromium" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
