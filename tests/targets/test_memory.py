"""Fresh CPU output buffers with the huge-page hint (``opgen.targets.memory``)."""
from __future__ import annotations

import torch

from opgen.targets import memory


def test_empty_is_a_plain_tensor_of_the_requested_kind():
    for shape, dtype in (((3, 5), torch.float32), ((1 << 21,), torch.float32), ((2, 1 << 20), torch.float64),
                         ((0,), torch.float32)):
        t = memory.empty(shape, dtype)
        assert tuple(t.shape) == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
        t.fill_(1.5)
        assert t.numel() == 0 or float(t.sum()) == 1.5 * t.numel()


def test_the_hint_covers_only_whole_aligned_huge_pages(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda addr, n, advice: calls.append((addr, n, advice)) or 0)
    small = torch.empty(1000)
    memory.advise_huge_pages(small)
    assert calls == []                                        # below HUGE_MIN_BYTES: left alone
    big = torch.empty(3 << 20)                               # 12 MiB
    memory.advise_huge_pages(big)
    (addr, n, advice), = calls
    start, end = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert advice == memory.MADV_HUGEPAGE and addr % memory.HUGE_PAGE == 0 and n % memory.HUGE_PAGE == 0
    assert start <= addr and addr + n <= end and n >= (end - start) - 2 * memory.HUGE_PAGE
