"""`init_tinker_client()`: the extras the stock Tinker SDK lacks against a self-hosted Twinkle server.

    from twinkle.tinker_patch import init_tinker_client
    service_client = init_tinker_client(base_url="http://host:8000", api_key="my-key")

It (1) lets `get_tokenizer()` load the tokenizer from the server when it is not a local folder or
reachable on the Hub, and (2) accepts API keys without the `tml-` prefix. `get_image_processor(name)`
does for a vision-language model's image processor what (1) does for the tokenizer. Keys with the prefix and
local tokenizers leave the SDK's own behaviour untouched. Only the `tinker` SDK and the standard
library are used, and nothing is imported until the function is called (no torch needed to import).
"""

from twinkle.tinker_patch.patch import get_image_processor, init_tinker_client, tokenizer_cache_dir

__all__ = ["get_image_processor", "init_tinker_client", "tokenizer_cache_dir"]
