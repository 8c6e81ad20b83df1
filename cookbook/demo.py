"""`make demo`: start a Twinkle server on the embedded model, train it through the Tinker SDK to
say who it is, show its answers before and after, and stop the server.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twinkle.devserver import start_dev_server

COOKBOOK = Path(__file__).resolve().parent
RECIPE = COOKBOOK / "client" / "tinker" / "self_host" / "self_cognition.py"
DEMO_KEY = "tml-demo-key"


def main() -> int:
    out = Path("outputs/demo").resolve()
    started = time.time()
    print("Starting a Twinkle server (embedded Ray, twinkle-tiny) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="twinkle-demo-") as work:
        with start_dev_server(work, keys={"demo": DEMO_KEY}) as server:
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
