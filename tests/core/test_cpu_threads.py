"""Small CPU passes run on one torch thread; everything else on the configured count."""

from __future__ import annotations

import torch

from twinkle.backends.cpu_threads import SMALL_PASS_TOKENS, threads_for_pass


def test_small_cpu_passes_run_on_one_thread_and_restore_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for_pass(SMALL_PASS_TOKENS - 1, torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for_pass(SMALL_PASS_TOKENS, torch.device("cpu")):
            assert torch.get_num_threads() == 2  # big enough to split
        with threads_for_pass(1, torch.device("cuda")):
            assert torch.get_num_threads() == 2  # a GPU pass keeps the host threads as they are
        try:
            with threads_for_pass(1, torch.device("cpu")):
                raise RuntimeError("a failing pass")
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 2  # restored when the pass raises too
    finally:
        torch.set_num_threads(before)
