"""How many CPU threads a training pass runs on.

torch splits a large op across its OpenMP threads, and every split ends at a barrier where the
threads wait for each other. A pass of a few dozen tokens gains nothing from the split (in-process
on 2 cores, a 16-token forward is as fast on one thread), but in a server each barrier waits for a
thread that the HTTP replica, the scheduler or the client just took off a core: measured on the
2-core machine, the trivial forward's worker call fell from ~21 ms to ~15 ms on one thread, while
an 8 x 128-token step runs ~1.5x faster on two. So small passes run on one thread and the rest on
the configured count. GPU passes are untouched. The rule depends only on the pass, so local mode
and the server's workers compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_PASS_TOKENS = 64  # below this many tokens a CPU pass runs on one thread


@contextmanager
def threads_for_pass(tokens: int, device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU pass of `tokens` tokens on one thread if it is small; restore after."""
    before = torch.get_num_threads()
    if device.type != "cpu" or tokens >= SMALL_PASS_TOKENS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
