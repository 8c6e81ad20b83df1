"""The API's backend for a remote server: ids, sequence numbers, futures, heartbeats.

Each call is validated here (before anything is sent), numbered (models: seq 1, 2, ... after the
create at seq 0; samplers: 0, 1, ...), then submitted on a small thread pool in one request that
also waits for the result, so a script can pipeline calls exactly as in local mode.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import hashlib
import itertools
import json
import logging
import os
import threading
from pathlib import Path

from twinkle import ids
from twinkle.api.futures import Future
from twinkle.api.spec import API_METHODS
from twinkle.errors import SessionExpiredError, error_from_dict
from twinkle.client.transports import Transport

log = logging.getLogger(__name__)


class RemoteBackend:
    def __init__(self, transport: Transport, *, heartbeat_s: float = 10.0, poll_timeout_s: float = 30.0,
                 metadata: dict | None = None) -> None:
        self.transport = transport
        self.poll_timeout_s = poll_timeout_s
        self.session_id: str = transport.request("session", {"metadata": metadata or {}})["session_id"]
        self._lock = threading.Lock()
        self._model_numbers = itertools.count(0)
        self._sampler_numbers = itertools.count(0)
        self._seq: dict[str, itertools.count] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="twinkle-poll")
        self._tokenizers: dict = {}  # base model (or ("image_processor", base model)) -> loaded object
        self._closed = threading.Event()
        self._unsent = 0  # calls made but not yet accepted by the server
        self._sent = threading.Condition()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                           name="twinkle-heartbeat")
        self._heartbeat.start()
        atexit.register(self.close)

    # ------------------------------------------------------------- session
    def _beat(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.transport.request("heartbeat", {"session_id": self.session_id})
            except SessionExpiredError:
                return
            except Exception as exc:  # keep beating; the server may be restarting
                log.debug("heartbeat failed: %s", exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        with self._sent:  # every call made before close reaches the server, awaited or not
            self._sent.wait_for(lambda: self._unsent == 0, timeout=self.poll_timeout_s + 60.0)
        self._closed.set()
        try:
            self.transport.request("finish", {"session_id": self.session_id})
        except Exception as exc:  # the server may already be gone
            log.debug("could not finish session: %s", exc)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()

    # --------------------------------------------------------------- calls
    def _next_seq(self, target_id: str, start: int) -> int:
        with self._lock:
            counter = self._seq.setdefault(target_id, itertools.count(start))
            return next(counter)

    def _new_id(self, kind: str) -> str:
        with self._lock:
            if kind == "model":
                return ids.model_id(self.session_id, next(self._model_numbers))
            return ids.sampler_id(self.session_id, next(self._sampler_numbers))

    def call(self, method: str, target_id: str | None, args) -> Future:
        spec = API_METHODS[method]
        args = args if isinstance(args, spec.args) else spec.args.model_validate(args)
        if spec.target == "service":
            target_id = self._new_id("model" if method.startswith("create_model") else "sampler")
            seq_id = 0 if method.startswith("create_model") else None
        elif spec.target == "model":
            seq_id = self._next_seq(target_id, 1)
            if method == "create_sampler_from_model" and args.sampler_id is None:
                args = args.model_copy(update={"sampler_id": self._new_id("sampler")})
        else:
            seq_id = self._next_seq(target_id, 0)
        payload = {"method": method, "target_id": target_id, "seq_id": seq_id,
                   "args": args.model_dump(mode="python"), "wait": self.poll_timeout_s}
        with self._sent:
            self._unsent += 1
        return Future(self._pool.submit(self._run, payload, spec.result))

    def _accepted(self) -> None:
        with self._sent:
            self._unsent -= 1
            self._sent.notify_all()

    def _run(self, payload: dict, result_type):
        """Submit and wait in one request (the server holds it until the result is ready or the
        poll times out), then long-poll if needed. Calls still run in program order: the server
        orders a target's calls by the seq_id assigned when the call was made."""
        try:
            reply = self.transport.request("submit", payload, timeout=self.poll_timeout_s)
        finally:
            self._accepted()
        request_id = reply["request_id"]
        while True:
            status = reply.get("status")
            if status == "done":
                return result_type.model_validate(reply["result"])
            if status == "failed":
                error = reply.get("error") or {}
                raise error_from_dict(error, error.get("status_code"))
            reply = self.transport.request("retrieve", {"request_id": request_id, "timeout": self.poll_timeout_s},
                                           timeout=self.poll_timeout_s)

    # ----------------------------------------------------------- tokenizer
    def get_tokenizer(self, base_model: str, tokenizer_path: str | None = None):
        """The model's tokenizer, fetched from the server once and cached on disk."""
        if base_model in self._tokenizers:
            return self._tokenizers[base_model]
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("get_tokenizer() needs the transformers package: pip install transformers") from None
        self._tokenizers[base_model] = AutoTokenizer.from_pretrained(str(self._model_files(base_model)))
        return self._tokenizers[base_model]

    def get_image_processor(self, base_model: str, tokenizer_path: str | None = None):
        """The model's image processor (vision-language models), from the same files as the tokenizer."""
        key = ("image_processor", base_model)
        if key not in self._tokenizers:
            from twinkle.chat_images import load_image_processor

            self._tokenizers[key] = load_image_processor(str(self._model_files(base_model)), base_model)
        return self._tokenizers[key]

    def _model_files(self, base_model: str) -> Path:
        """A local folder with the model's tokenizer (and image processor) files, fetched from the
        server once and cached on disk by content."""
        files = self.transport.request("tokenizer", {"base_model": base_model})["files"]
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(os.environ.get("TWINKLE_TOKENIZER_CACHE") or Path.home() / ".cache" / "twinkle" / "tokenizers")
        folder = root / base_model.replace("/", "--") / digest
        if not (folder / ".complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                if "/" not in name and not name.startswith("."):
                    (folder / name).write_bytes(base64.b64decode(content))
            (folder / ".complete").touch()
        return folder
