"""Every runnable snippet of docs/quickstart.md runs as written, against the tiny demo model.

The page's fenced ```python and ```bash blocks are extracted in order. A block whose previous
non-blank line is ``<!-- not-run: REASON -->`` is left out (set-up commands, GPU and hub
snippets); every other one runs, in document order, in one scratch directory:

* python blocks share one namespace in one interpreter (the page reads as one session);
* bash blocks run each in ``bash -e -o pipefail`` with the venv's ``bin/`` first on PATH.

FMOE_CACHE points at a temporary directory, so the demo checkpoint is built afresh and in
isolation. Other fence languages that look runnable (py, sh, shell, console) are refused, so a
snippet cannot silently escape the test by its spelling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "quickstart.md"
RUN_LANGS = {"python", "bash"}
SUSPECT_LANGS = {"py", "python3", "sh", "shell", "console", "zsh", "pycon"}
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MIN_RUN = 8             # the page has 10 runnable blocks; fewer than this means something broke
SERVER_PORT = 8000      # the port the serving snippet uses


@dataclass
class Block:
    lang: str
    line: int           # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason, when marked


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{PAGE.name}:{start + 1}: unclosed code fence")
        i += 1
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = NOT_RUN.match(lines[prev].strip()) if prev >= 0 else None
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in body) + "\n"
        blocks.append(Block(lang, start + 1, code, marker.group("reason") if marker else None))
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in RUN_LANGS and b.not_run is None]


def test_page_blocks_are_well_formed():
    text = PAGE.read_text()
    blocks = parse_blocks(text)
    suspects = [f"line {b.line}: ```{b.lang}" for b in blocks if b.lang in SUSPECT_LANGS]
    assert not suspects, ("use ```python or ```bash (run by this test) or mark the block "
                          f"<!-- not-run: reason -->: {suspects}")
    # every not-run marker sits right above a code block
    marked = {b.line for b in blocks if b.not_run}
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if "not-run" in line:
            assert NOT_RUN.match(line.strip()), f"line {n}: malformed marker {line!r}"
            nxt = next(k for k in range(n, len(lines)) if lines[k].strip()) + 1
            assert nxt in marked, f"line {n}: a not-run marker must directly precede a code block"
    # the GPU / hub snippets are present and excluded; the rest is plenty
    assert any("cuda" in b.code and b.not_run for b in blocks), "the GPU section lost its marker"
    assert not any("cuda" in b.code for b in runnable(blocks)), "a runnable block needs a GPU"
    assert len(runnable(blocks)) >= MIN_RUN


# Runs the blocks in a fresh interpreter: python blocks share one namespace, bash blocks run in
# subprocesses; prints one line per block and exits non-zero at the first failure.
DRIVER = r'''
import json, subprocess, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
page = sys.argv[2]
ns = {"__name__": "__quickstart__"}
for n, b in enumerate(blocks, 1):
    where = f"{page}:{b['line']} ({b['lang']} block {n} of {len(blocks)})"
    print(f"=== running {where}", flush=True)
    t0 = time.perf_counter()
    if b["lang"] == "python":
        try:
            exec(compile(b["code"], f"{page}:{b['line']}", "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print(f"=== FAILED {where}", flush=True)
            sys.exit(1)
    else:
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b["code"]], timeout=240)
        if r.returncode != 0:
            print(f"=== FAILED {where}: exit code {r.returncode}", flush=True)
            sys.exit(1)
    print(f"=== ok {where} in {time.perf_counter() - t0:.1f} s", flush=True)
print(f"=== ran {len(blocks)} blocks", flush=True)
'''


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_quickstart_snippets_run(tmp_path):
    blocks = runnable(parse_blocks(PAGE.read_text()))
    # the environment the serving snippet needs; a CI machine has both
    skipped = []
    if not _port_free(SERVER_PORT):
        skipped += [b for b in blocks if f":{SERVER_PORT}" in b.code]
    if shutil.which("curl") is None:
        skipped += [b for b in blocks if "curl " in b.code and b not in skipped]
    blocks = [b for b in blocks if b not in skipped]
    assert len(blocks) >= MIN_RUN - len(skipped)

    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    (tmp_path / "blocks.json").write_text(json.dumps([asdict(b) for b in blocks]))
    (tmp_path / "driver.py").write_text(DRIVER)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, FMOE_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               # one torch thread: on a small shared CPU, oversubscribed threads are far slower
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    try:
        r = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json"),
                            "docs/quickstart.md"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        so = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the quickstart snippets did not finish in 300 s; last output:\n{so[-4000:]}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert f"=== ran {len(blocks)} blocks" in r.stdout, out[-8000:]
    assert r.stdout.count("=== ok ") == len(blocks)
    # what the snippets were meant to show did happen
    assert (work / "my-trace.npz").exists() and (work / "demo-store" / "fmoe-store.json").exists()
    assert '"text_completion"' in r.stdout or any(b for b in skipped if "curl" in b.code)
    if skipped:
        warnings.warn(f"ran {len(blocks)} quickstart blocks; left out {len(skipped)} (port "
                      f"{SERVER_PORT} busy or no curl): lines {[b.line for b in skipped]}", stacklevel=2)
