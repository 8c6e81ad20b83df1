"""The two small SDK extensions behind `init_tinker_client()` (idempotent)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

_KEY_PREFIXES = ("tml-", "eyJ")
_state: dict = {"base_url": None, "api_key": None, "key_patch": False, "tokenizer_patch": False}


def tokenizer_cache_dir() -> Path:
    root = os.environ.get("TWINKLE_TOKENIZER_CACHE") or os.path.join(Path.home(), ".cache", "twinkle", "tokenizers")
    return Path(root)


def _fetch_tokenizer(base_url: str, api_key: str | None, model_name: str) -> str | None:
    """Download the tokenizer files of `model_name` from the server; return the local folder."""
    url = f"{base_url.rstrip('/')}/api/v1/twinkle/tokenizer/{urllib.parse.quote(model_name, safe='/')}"
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as reply:
            payload = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None  # the server loads this tokenizer from the Hub too
        raise
    files = payload.get("files") or {}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    host = urllib.parse.urlparse(base_url).netloc.replace(":", "_")
    folder = tokenizer_cache_dir() / host / model_name.replace("/", "--") / digest
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            if "/" in name or name.startswith("."):
                continue
            (folder / name).write_bytes(base64.b64decode(content))
        (folder / ".complete").touch()
    return str(folder)


def _patch_tokenizer_loader() -> None:
    """Wrap the SDK's tokenizer loader: local folder, else the server's copy, else the SDK's way."""
    if _state["tokenizer_patch"]:
        return
    from tinker.lib.public_interfaces import sampling_client, training_client

    original = sampling_client._load_tokenizer_from_model_info
    cache: dict[tuple, object] = {}

    def load(model_name: str, tokenizer_id: str | None = None, *args, **kwargs):
        key = (model_name, tokenizer_id)
        if key in cache:
            return cache[key]
        from transformers import AutoTokenizer

        tokenizer = None
        if tokenizer_id and os.path.isdir(tokenizer_id):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
        elif _state["base_url"]:
            folder = _fetch_tokenizer(_state["base_url"], _state["api_key"], model_name.split(":")[0])
            if folder:
                tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer is None:
            tokenizer = original(model_name, tokenizer_id, *args, **kwargs)
        cache[key] = tokenizer
        return tokenizer

    sampling_client._load_tokenizer_from_model_info = load
    training_client._load_tokenizer_from_model_info = load
    _state["tokenizer_patch"] = True


def _patch_key_check() -> None:
    """Accept keys without the `tml-` prefix (self-hosted servers issue their own keys)."""
    if _state["key_patch"]:
        return
    from tinker.lib import _auth_token_provider

    provider = _auth_token_provider.ApiKeyAuthProvider
    original_init = provider.__init__

    def __init__(self, api_key, *args, **kwargs):
        if not api_key or api_key.startswith(_KEY_PREFIXES):
            return original_init(self, api_key, *args, **kwargs)
        stand_in = "tml-" + api_key
        original_init(self, stand_in, *args, **kwargs)
        for attr, value in list(vars(self).items()):  # store the real key where the SDK keeps it
            if value == stand_in:
                setattr(self, attr, api_key)

    provider.__init__ = __init__
    _state["key_patch"] = True


def init_tinker_client(base_url: str | None = None, api_key: str | None = None, **service_kwargs):
    """Prepare the Tinker SDK for a Twinkle server and return a `tinker.ServiceClient` for it.

    `base_url` and `api_key` default to $TINKER_BASE_URL and $TINKER_API_KEY (then $TWINKLE_API_KEY);
    they are also exported so that `tinker.ServiceClient()` created later finds them.
    """
    base_url = base_url or os.environ.get("TINKER_BASE_URL")
    api_key = api_key or os.environ.get("TINKER_API_KEY") or os.environ.get("TWINKLE_API_KEY")
    if not base_url:
        raise ValueError("give base_url or set TINKER_BASE_URL to the Twinkle server, e.g. http://127.0.0.1:8000")
    os.environ["TINKER_BASE_URL"] = base_url
    if api_key:
        os.environ["TINKER_API_KEY"] = api_key
    _state.update(base_url=base_url, api_key=api_key)
    _patch_tokenizer_loader()
    if api_key and not api_key.startswith(_KEY_PREFIXES):
        _patch_key_check()
    import tinker

    return tinker.ServiceClient(base_url=base_url, api_key=api_key, **service_kwargs)


def get_image_processor(model_name: str, base_url: str | None = None, api_key: str | None = None):
    """The image processor of a vision-language model a Twinkle server hosts, to count an image's tokens
    (`expected_tokens`, and where the image's targets go) as tinker-cookbook's vision renderers do.

    A local folder, or a name in this machine's Hugging Face cache, loads directly; otherwise the files
    come from the server (`base_url`/`api_key`, default: what `init_tinker_client` was given)."""
    from transformers import AutoImageProcessor

    if os.path.isdir(model_name):
        return AutoImageProcessor.from_pretrained(model_name)
    base_url = base_url or _state["base_url"] or os.environ.get("TINKER_BASE_URL")
    api_key = api_key or _state["api_key"] or os.environ.get("TINKER_API_KEY")
    if base_url:
        folder = _fetch_tokenizer(base_url, api_key, model_name.split(":")[0])
        if folder:
            if not (Path(folder) / "preprocessor_config.json").exists():
                raise ValueError(f"{model_name} is a text-only model on {base_url}: it has no image processor")
            return AutoImageProcessor.from_pretrained(folder)
    return AutoImageProcessor.from_pretrained(model_name)
