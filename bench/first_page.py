"""From ``make run`` (install done) to the first chapter drawn in a real browser, on an empty cache.

    .venv/bin/python bench/first_page.py [--case decoy-mnist] [--watch 0]

Does what ``make run`` does, in a temporary cache: ``python -m core build CASE --stages data``,
``python -m core build CASE --background``, ``streamlit run app.py``; then Debian's chromium
(Playwright) opens the default chapter and waits until its title and its sample images are drawn.
Prints the seconds of each step and the total from the first command to the drawn page, the
load average (the machine is shared), and, with ``--watch S``, when the chapter's accuracy chart
(drawn from the models stage, which the background build lands) appears without a reload. The background
worker is killed at the end (it would otherwise finish the whole build in the temporary cache).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.casestudy import worker  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def _serve(env: dict, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def _healthy(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("streamlit did not come up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decoy-mnist")
    ap.add_argument("--port", type=int, default=8599)
    ap.add_argument("--watch", type=float, default=0.0, metavar="S",
                    help="then watch the page for S seconds and print when each stage lands")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="casebook-first-page-"))
    cache = tmp / "cache"
    env = {**os.environ, "CASEBOOK_CACHE": str(cache), "CASEBOOK_CASE": args.case,
           "CASEBOOK_BACKGROUND": "1"}
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    server = None
    try:
        subprocess.run([sys.executable, "-m", "core", "build", args.case, "--stages", "data"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        steps["build --stages data"] = time.perf_counter() - t0
        subprocess.run([sys.executable, "-m", "core", "build", args.case, "--background"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        steps["build --background"] = time.perf_counter() - t0 - sum(steps.values())
        url = f"http://127.0.0.1:{args.port}"
        server = _serve(env, args.port, tmp / "server.log")
        _healthy(url)
        steps["server up"] = time.perf_counter() - t0 - sum(steps.values())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_selector(f"{READY} h1")
            page.wait_for_function("""() => [...document.querySelectorAll(
                '[data-testid="stMain"] [data-testid="stImage"] img')]
                .filter(i => i.complete && i.naturalWidth > 0).length >= 4""")
            steps["first chapter drawn"] = time.perf_counter() - t0 - sum(steps.values())
            total = time.perf_counter() - t0
            for name, seconds in steps.items():
                print(f"{name:>22}: {seconds:6.1f} s")
            print(f"{'total':>22}: {total:6.1f} s  (load average {os.getloadavg()[0]:.1f})")
            seen: set[str] = set()
            deadline = time.monotonic() + args.watch
            while time.monotonic() < deadline:
                charts = page.locator('[data-testid="stMain"] [data-testid="stVegaLiteChart"]')
                if charts.count() and "accuracy chart" not in seen:
                    seen.add("accuracy chart")
                    print(f"{'accuracy chart drawn':>22}: {time.perf_counter() - t0:6.1f} s "
                          "after the first command (no reload)")
                if "accuracy chart" in seen:
                    break
                time.sleep(1.0)
            browser.close()
    finally:
        record = worker.running(args.case, cache)
        if record:
            os.killpg(record["pid"], signal.SIGKILL)
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
