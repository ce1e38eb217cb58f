"""Screenshots of the documentation site in headless Chromium, and a check that nothing is missing.

    python tools/screenshot_docs.py                  # build the site, shoot home + benchmarks
    python tools/screenshot_docs.py --site site      # use an already built site
    python tools/screenshot_docs.py --pages "" benchmarks/ quickstart/ --out /tmp/shots

Steps:

1. build the site with ``mkdocs build --strict`` into a temporary directory (unless --site);
2. check every built HTML page: each local asset it references (scripts, stylesheets, icons,
   images) exists in the site, and no asset comes from another host (the site must render
   offline);
3. serve the site on 127.0.0.1 (a free port) with ``http.server`` in a thread, logging every
   request and its status;
4. run ``chromium --headless --screenshot`` on each page, writing ``docs/img/screenshot-NAME.png``;
5. fail if any request got a 4xx/5xx answer, if a page did not load its stylesheets and
   scripts, or if a screenshot is missing or blank.

Needs Debian's ``chromium`` (``apt-get install chromium``); CI does not run this. Exit codes:
0 all good, 1 a problem was found (listed), 2 chromium is not installed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEFAULT_PAGES = ("", "benchmarks/")          # home and benchmarks, as URL paths under the site


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def build_site(dest: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(dest)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"screenshot_docs: mkdocs build failed:\n{r.stdout}{r.stderr}")


# -- static check of the built HTML ----------------------------------------------------------

class AssetRefs(HTMLParser):
    """Collects the URLs a page loads by itself (not the links a reader may follow)."""

    LINK_RELS = {"stylesheet", "icon", "shortcut", "apple-touch-icon", "preload", "modulepreload",
                 "manifest", "prefetch"}

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and a.get("src"):
            self.refs.append(a["src"])
        if tag == "link" and a.get("href"):
            rels = set((a.get("rel") or "").lower().split())
            if rels & self.LINK_RELS:
                self.refs.append(a["href"])
        if tag == "img" and a.get("srcset"):
            self.refs += [part.strip().split()[0] for part in a["srcset"].split(",") if part.strip()]


def check_static(site: Path) -> list[str]:
    problems = []
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"{site}: no HTML pages"]
    for page in pages:
        parser = AssetRefs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        rel_page = page.relative_to(site).as_posix()
        for ref in parser.refs:
            parts = urlsplit(ref)
            if ref.startswith("data:"):
                continue
            if parts.scheme or ref.startswith("//"):
                problems.append(f"{rel_page}: asset from another host (the site must work offline): {ref}")
                continue
            target = urljoin("/" + rel_page, parts.path)
            path = site / unquote(target).lstrip("/")
            if path.is_dir():
                path = path / "index.html"
            if not path.is_file():
                problems.append(f"{rel_page}: missing asset {ref} (looked for {path.relative_to(site)})")
    return problems


# -- serving with a request log ----------------------------------------------------------------

class LoggingHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]] = []           # replaced per server
    lock = threading.Lock()

    def log_request(self, code="-", size="-"):
        try:
            status = int(getattr(code, "value", code))
        except (TypeError, ValueError):
            status = 0
        with self.lock:
            self.log.append((self.path, status))

    def log_message(self, format, *args):      # keep the console quiet
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, list[tuple[str, int]]]:
    log: list[tuple[str, int]] = []
    handler = type("Handler", (LoggingHandler,), {"log": log})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, name="docs-server", daemon=True).start()
    return server, log


# -- screenshots -------------------------------------------------------------------------------

def shot_name(page: str) -> str:
    name = page.strip("/").replace("/", "-")
    return f"screenshot-{name or 'home'}.png"


def screenshot(chromium: str, url: str, png: Path, size: str, timeout: float) -> str | None:
    with tempfile.TemporaryDirectory(prefix="fmoe-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000",
               f"--screenshot={png}", f"--window-size={size}", url]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"{url}: chromium did not finish within {timeout:.0f} s"
    if r.returncode != 0:
        return f"{url}: chromium exited with {r.returncode}: {r.stderr.strip()[-2000:]}"
    if not png.is_file() or png.stat().st_size < 2000:
        return f"{url}: no screenshot written (or an empty one) at {png}"
    return None


def png_is_blank(png: Path) -> bool:
    """True when every pixel has the same colour (needs Pillow; False without it)."""
    try:
        from PIL import Image
    except ImportError:
        return False
    with Image.open(png) as im:
        lo_hi = im.convert("L").getextrema()
    return lo_hi[0] == lo_hi[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, help="an already built site (default: build one with mkdocs)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default docs/img)")
    ap.add_argument("--pages", nargs="+", default=list(DEFAULT_PAGES),
                    help='URL paths under the site ("" = home, "benchmarks/")')
    ap.add_argument("--window-size", default="1280,1600", help="width,height in CSS pixels")
    ap.add_argument("--chromium", help="the browser binary (default: chromium, then chromium-browser, ...)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per screenshot")
    args = ap.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("screenshot_docs: chromium not found; install it (Debian: apt-get install chromium) "
              "or pass --chromium PATH", file=sys.stderr)
        return 2

    tmp = None
    if args.site is None:
        tmp = tempfile.TemporaryDirectory(prefix="fmoe-site-")
        site = Path(tmp.name) / "site"
        print("building the site (mkdocs build --strict) ...", flush=True)
        build_site(site)
    else:
        site = args.site.resolve()
        if not (site / "index.html").is_file():
            print(f"screenshot_docs: {site} has no index.html; build it with `make docs`", file=sys.stderr)
            return 1

    problems = check_static(site)
    n_pages = len(list(site.rglob("*.html")))
    print(f"static check: {n_pages} HTML pages, {len(problems)} problem(s)")

    args.out.mkdir(parents=True, exist_ok=True)
    server, log = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        for page in args.pages:
            url = base + page.lstrip("/")
            if not (site / page.lstrip("/") / "index.html").is_file() and not (site / page.lstrip("/")).is_file():
                problems.append(f"{page or '/'}: no such page in the site")
                continue
            png = args.out / shot_name(page)
            start = len(log)
            t0 = time.perf_counter()
            err = screenshot(chromium, url, png, args.window_size, args.timeout)
            time.sleep(0.2)                   # let the last requests be logged
            got = log[start:]
            if err:
                problems.append(err)
                continue
            kinds = {os.path.splitext(urlsplit(p).path)[1] for p, _ in got}
            for need in (".css", ".js"):
                if need not in kinds:
                    problems.append(f"{url}: the page loaded no {need} file: it rendered unstyled")
            if png_is_blank(png):
                problems.append(f"{png}: the screenshot is blank")
            print(f"{url} -> {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png} "
                  f"({png.stat().st_size // 1024} KiB, {len(got)} requests, "
                  f"{time.perf_counter() - t0:.1f} s)")
    finally:
        server.shutdown()
        server.server_close()

    failed = [(p, s) for p, s in log if s >= 400]
    for path, status in failed:
        problems.append(f"request {path} answered {status}")
    print(f"server: {len(log)} requests, {len(failed)} failed")
    if tmp is not None:
        tmp.cleanup()
    if problems:
        print("\nproblems:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("ok: every page rendered with all its assets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
