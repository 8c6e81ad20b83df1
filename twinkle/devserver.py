"""Run `twinkle serve` as a subprocess: for the demo, the benchmarks and the tests.

The server is started exactly as an operator would (the CLI with a config file), waited for on
/api/v1/healthz, and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class DevServer:
    url: str
    keys: dict[str, str]
    state_dir: Path
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM, as an operator would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "DevServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_dev_server(work_dir: str | os.PathLike, *, config: dict | None = None, keys: dict[str, str] | None = None,
                     timeout_s: float = 240.0, quiet_ray: bool = True) -> DevServer:
    """Start a server for `twinkle-tiny` (or `config["models"]`) on a free loopback port."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full = _merge({"host": "127.0.0.1", "port": port, "state_dir": str(work / "state"),
                   "models": [{"name": "twinkle-tiny"}]}, config or {})
    config_path = work / "server.yaml"
    config_path.write_text(yaml.safe_dump(full))
    env = dict(os.environ)
    env["TWINKLE_API_KEYS"] = ",".join(f"{t}:{k}" for t, k in (keys or {}).items())
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path = work / "server.log"
    twinkle_cli = str(Path(sys.executable).with_name("twinkle"))
    process = subprocess.Popen([twinkle_cli, "serve", "--config", str(config_path)], cwd=work, env=env,
                               stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = DevServer(f"http://127.0.0.1:{full['port']}", dict(keys or {}), Path(full["state_dir"]), log_path,
                       process)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twinkle serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/api/v1/healthz", timeout=2) as reply:
                if reply.status == 200 and _started_by(server.state_dir, process.pid):
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"twinkle serve did not become healthy in {timeout_s:.0f}s:\n{server.log_tail()}")


def _started_by(state_dir: Path, pid: int) -> bool:
    """The server finished starting: it wrote its server.json (the port may answer a moment before)."""
    import json

    try:
        return json.loads((state_dir / "server.json").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False
