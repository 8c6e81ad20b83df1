"""`make demo`: start a Twinkle server on the embedded model, train it through the Tinker SDK to
say who it is, show its answers before and after, and stop the server.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from twinkle.devserver import start_dev_server

COOKBOOK = Path(__file__).resolve().parent
RECIPE = COOKBOOK / "client" / "tinker" / "self_host" / "self_cognition.py"
DEMO_KEY = "tml-demo-key"


def _last_event(log: Path) -> str:
    """The newest line of the server's log, without its timestamp: what the start is doing now."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    last = re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+\s+", "", lines[-1]) if lines else ""
    return last if len(last) <= 110 else last[:107] + "..."


@contextmanager
def ticking(what: str, log: Path, every_s: float = 10.0):
    """Print a line every `every_s` seconds while a quiet step (Ray and the server starting) runs,
    with the server log's newest line, so a slow start on a busy machine never looks hung."""
    started, done = time.time(), threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            event = _last_event(log)
            print(f"  ... {what} ({time.time() - started:.0f}s){': ' + event if event else ''}", flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def main() -> int:
    out = Path("outputs/demo").resolve()
    started = time.time()
    print("Starting a Twinkle server (embedded Ray, twinkle-tiny) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="twinkle-demo-") as work:
        with ticking("starting Ray, the model worker and the HTTP server", Path(work) / "server.log"):
            server = start_dev_server(work, keys={"demo": DEMO_KEY})
        with server:
            print(f"Server ready at {server.url} after {time.time() - started:.1f}s; running the Tinker "
                  "self-cognition recipe against it\n", flush=True)
            code = subprocess.call([sys.executable, str(RECIPE), "--base-url", server.url, "--api-key", DEMO_KEY,
                                    "--out", str(out)])
            if code != 0:
                print(f"\nthe recipe failed (exit {code}); server log tail:\n{server.log_tail(30)}")
        print(f"\nServer stopped. Demo took {time.time() - started:.0f}s; metrics and loss plot in {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
