"""hostmem.py: tensors copied side by side into one block in 2 MB pages, or left as they are."""
from __future__ import annotations

import pytest
import torch

from picochat.errors import PicochatError
from picochat.hostmem import ALIGN, HUGE_PAGE, huge_pages_available, in_huge_pages

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this machine")


@needs_thp
def test_tensors_are_copied_into_one_aligned_block():
    torch.manual_seed(0)
    ts = [torch.randint(0, 255, (1000, 1001), dtype=torch.uint8), torch.randn(300, 7),
          torch.randn(5, dtype=torch.bfloat16), torch.randint(-9, 9, (2, 3, 4), dtype=torch.int8)]
    out = in_huge_pages(ts)  # ~1 MB in all: under a huge page, so left alone unless asked
    assert all(a is b for a, b in zip(out, ts))
    out = in_huge_pages(ts, huge=True)
    assert all(torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape for a, b in zip(out, ts))
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1  # one block
    assert out[0].data_ptr() % HUGE_PAGE == 0 and all(t.data_ptr() % ALIGN == 0 for t in out)
    out[1].zero_()
    assert ts[1].abs().sum() > 0  # copies: the originals untouched
    assert all(torch.equal(out[i], ts[i]) for i in (0, 2, 3))  # and no copy overlaps another
    big = [torch.ones(3 << 20, dtype=torch.uint8)]  # 3 MB: moved by default
    assert in_huge_pages(big)[0].data_ptr() % HUGE_PAGE == 0


def test_left_alone_where_huge_pages_are_not_asked_for(monkeypatch):
    big = [torch.ones(3 << 20, dtype=torch.uint8)]
    assert in_huge_pages(big, huge=False)[0] is big[0]
    assert in_huge_pages([]) == []
    with pytest.raises(PicochatError, match="huge pages are for CPU tensors"):
        in_huge_pages([torch.empty(3 << 20, dtype=torch.uint8, device="meta")], huge=True)
    monkeypatch.setenv("PICOCHAT_HUGE_PAGES", "0")
    huge_pages_available.cache_clear()
    try:
        assert in_huge_pages(big)[0] is big[0]
        with pytest.raises(PicochatError, match="PICOCHAT_HUGE_PAGES not 0"):
            in_huge_pages(big, huge=True)
    finally:
        monkeypatch.delenv("PICOCHAT_HUGE_PAGES")
        huge_pages_available.cache_clear()
