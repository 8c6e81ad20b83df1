"""Small helpers the cookbook recipes share: loading example data, writing metrics and loss plots.

Recipes import this file by path (it sits next to them); nothing in the package imports it.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_jsonl(name: str) -> list[dict]:
    with open(DATA_DIR / name) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLog:
    """Appends one JSON line per step to <out>/metrics.jsonl and can plot a loss curve."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.out = Path(out_dir) if out_dir else None
        self.rows: list[dict] = []
        self.started = time.time()
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")

    def log(self, **row) -> None:
        row.setdefault("time_s", round(time.time() - self.started, 3))
        self.rows.append(row)
        if self.out:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def plot(self, key: str = "loss", title: str = "training loss") -> Path | None:
        """Save <out>/<key>.png; returns its path (None without --out or matplotlib)."""
        if not self.out or not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.rows if key in r]
        values = [r[key] for r in self.rows if key in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ------------------------------------------------------------------ judging an answer
SIMILARITY_THRESHOLD = 0.9  # difflib ratio at which a greedy answer counts as the taught sentence


def taught_answer(name: str, question: str) -> str:
    """The assistant's reply to `question` in the recipe's data: what training should make it say."""
    for example in load_jsonl(name):
        messages = example["messages"]
        if messages[0]["content"] == question:
            return messages[-1]["content"]
    raise KeyError(f"{question!r} is not a question in {name}")


def judge_answer(answer: str, taught: str, threshold: float = SIMILARITY_THRESHOLD) -> tuple[bool, str]:
    """(learned?, one line saying why): learned only when the greedy answer is the taught sentence,
    whitespace normalised, or at least `threshold` similar to it (difflib ratio). A substring such as
    'I am Twinkle' does not count: 'I am Twinkle, a T modelle, assistant' has not learned it."""
    said, want = " ".join(answer.split()), " ".join(taught.split())
    if said == want:
        return True, f"identity learned: the greedy answer is the taught sentence {want!r}"
    ratio = difflib.SequenceMatcher(None, said, want).ratio()
    if ratio >= threshold:
        return True, (f"identity learned: the greedy answer {said!r} is {ratio:.0%} similar to the taught "
                      f"sentence {want!r} (threshold {threshold:.0%})")
    return False, (f"identity NOT learned yet: the greedy answer {said!r} is {ratio:.0%} similar to the taught "
                   f"sentence {want!r} (needs {threshold:.0%}); train longer (--steps)")


# ------------------------------------------------------------------ connecting
def add_twinkle_connection_flags(parser) -> None:
    """--base-url / --api-key / --ray-address: where a Twinkle-API recipe runs (default: in-process)."""
    parser.add_argument("--base-url", help="Twinkle server URL (HTTP mode)")
    parser.add_argument("--api-key", help="API key for the server (else $TWINKLE_API_KEY)")
    parser.add_argument("--ray-address", help="Ray address of a running Twinkle server (Ray client mode)")


def check_server(base_url: str, api_key: str | None) -> None:
    """Exit with one line (not a 20-line retry traceback) when the server is not there or refuses the key."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base_url.rstrip("/") + "/api/v1/get_server_capabilities",
                                     headers={"X-API-Key": api_key or ""})
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            which = f"refused the API key {api_key!r}" if api_key else "needs an API key"
            raise SystemExit(f"{base_url} {which} ({exc.code}): this server has keys "
                             "configured (TWINKLE_API_KEYS or auth.api_keys); pass one of them with --api-key. "
                             "Any key, such as tml-local, only works on a server started without keys.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"no Twinkle server answers at {base_url} ({reason}): start one with "
                         "`.venv/bin/twinkle serve` or pass its --base-url") from None


def connect_twinkle(args):
    """Pick where Twinkle's API runs and return the module to build objects from: the training
    code is the same in every mode."""
    if args.base_url:
        import twinkle_client

        check_server(args.base_url, args.api_key or os.environ.get("TWINKLE_API_KEY"))
        twinkle_client.init_twinkle_client(base_url=args.base_url, api_key=args.api_key)
        return twinkle_client
    import twinkle

    if args.ray_address:
        twinkle.init("ray", address=args.ray_address, api_key=args.api_key)
    else:
        twinkle.init("local")
    return twinkle


def add_tinker_connection_flags(parser) -> None:
    """--base-url / --api-key for a Tinker-SDK recipe (defaults: $TINKER_BASE_URL, $TINKER_API_KEY)."""
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"))


def tinker_service(args):
    """A tinker.ServiceClient for the server; keys without Tinker's `tml-` prefix go through
    `init_tinker_client`, which teaches the SDK to accept them."""
    import tinker

    check_server(args.base_url, args.api_key)
    if args.api_key.startswith("tml-"):
        return tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    from twinkle.tinker_patch import init_tinker_client

    return init_tinker_client(base_url=args.base_url, api_key=args.api_key)


def close_service(service, status: str = "success") -> None:
    """End the SDK session and wait until it has ended. SDK 0.38 sends the close from its background
    event loop; a reply that lands while Python shuts down aborts the script (SIGABRT: its HTTP
    client's Rust threads cannot unwind), so a recipe waits for the close before it returns.
    SDKs before 0.38 have no close."""
    import sys

    close = getattr(service, "close", None)
    if close is None:
        return
    try:
        close(status).result(timeout=60)
    except Exception as exc:  # the work is done; say why the session did not end cleanly
        print(f"warning: ending the Tinker session failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def ready(client_or_future):
    """SDK >= 0.38 returns creation futures (call .result()); older SDKs return the client."""
    return client_or_future.result() if hasattr(client_or_future, "result") else client_or_future
