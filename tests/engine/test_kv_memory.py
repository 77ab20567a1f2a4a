"""The K/V caches' memory (engine/kv_cache.py's new_stores): one block under all of a cache's layers, on Linux
asked to be backed by 2 MB pages, and caches built on it that grow, cast and decode like ordinary tensors."""
from __future__ import annotations

import re

import pytest
import torch

from picochat.engine.kv_cache import KVCache, new_stores
from picochat.engine.slot_cache import SlotCache
from picochat.errors import PicochatError
from picochat.hostmem import HUGE_PAGE, huge_pages_available

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this machine")


def anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))


@needs_thp
def test_a_large_store_is_one_aligned_block_in_huge_pages():
    shape = (8, 3, 512, 64)  # 1.5 MB a layer in bf16: one layer alone could never fill a 2 MB page
    before = anon_huge_kb()
    k = new_stores(30, shape, torch.bfloat16)
    assert [tuple(t.shape) for t in k] == [shape] * 30 and all(t.dtype == torch.bfloat16 for t in k)
    assert k[0].data_ptr() % HUGE_PAGE == 0  # starts on a 2 MB boundary
    assert all(b.data_ptr() - a.data_ptr() == a.numel() * 2 for a, b in zip(k, k[1:]))  # back to back
    assert all(t.is_contiguous() and not t.any() for t in k)  # zeros, like torch.zeros
    for i, t in enumerate(k):
        t.fill_(i)  # touched: the kernel backs the block now
    assert [int(t[3, 2, 100, 5]) for t in k] == list(range(30))  # each layer its own memory
    assert anon_huge_kb() - before >= 40 * 1024  # ~45 MB of it in 2 MB pages (not every page: the block's ends)
    del k  # (the mapping goes with the last view of it)


def test_the_switch_turns_huge_pages_off(monkeypatch):
    monkeypatch.setenv("PICOCHAT_HUGE_PAGES", "0")
    huge_pages_available.cache_clear()
    try:
        assert not huge_pages_available()
        k = new_stores(4, (8, 3, 512, 64), torch.float32)
        assert len({t.untyped_storage().data_ptr() for t in k}) == 4  # ordinary tensors
        with pytest.raises(PicochatError, match="PICOCHAT_HUGE_PAGES"):
            new_stores(4, (8, 3, 512, 64), torch.float32, huge=True)
        monkeypatch.setenv("PICOCHAT_HUGE_PAGES", "off")  # not a value it knows: refused by name
        huge_pages_available.cache_clear()
        with pytest.raises(PicochatError, match="PICOCHAT_HUGE_PAGES='off'"):
            new_stores(4, (8, 3, 512, 64), torch.float32)
    finally:
        monkeypatch.delenv("PICOCHAT_HUGE_PAGES")
        huge_pages_available.cache_clear()


def test_small_stores_and_other_devices():
    small = new_stores(2, (1, 2, 4, 8), torch.float32)  # under a page: ordinary tensors
    assert len({t.untyped_storage().data_ptr() for t in small}) == 2 and not any(t.any() for t in small)
    plain = new_stores(4, (8, 3, 512, 64), torch.float32, huge=False)
    assert len({t.untyped_storage().data_ptr() for t in plain}) == 4  # four allocations, as before
    if not huge_pages_available():
        with pytest.raises(PicochatError, match="huge pages"):
            new_stores(4, (8, 3, 512, 64), torch.float32, huge=True)
    with pytest.raises(PicochatError, match="huge pages"):
        new_stores(4, (8, 3, 512, 64), torch.float32, device="meta", huge=True)


def test_caches_on_huge_pages_grow_cast_and_keep_their_values():
    kv = KVCache(2, 8, 3, 64, 600, max_len=4096)  # fp32: 3.7 MB a layer, 7.4 MB for K: a block of its own
    if huge_pages_available():
        assert kv.k[0].data_ptr() % HUGE_PAGE == 0 and kv.k[1].data_ptr() == kv.k[0].data_ptr() + 600 * 8 * 3 * 64 * 4
    kv.update(0, torch.ones(8, 3, 5, 64), torch.full((8, 3, 5, 64), 2.0))
    kv.update(1, torch.ones(8, 3, 5, 64), torch.full((8, 3, 5, 64), 3.0))
    kv.reserve(1000)  # grows to a new block, the written columns copied
    assert kv.capacity == 1200 and kv.pos == 5
    if huge_pages_available():
        assert kv.v[0].data_ptr() % HUGE_PAGE == 0
    assert float(kv.v[1][:, :, :5].mean()) == 3.0 and not kv.v[1][:, :, 5:].any()
    s = SlotCache(2, 16, 3, 64, 4096, capacity=256, dtype=torch.float32)
    s.k[1][3, :, :4] = 7.0
    s.set_dtype(torch.bfloat16)
    assert s.k[1].dtype == torch.bfloat16 and float(s.k[1][3, :, :4].mean()) == 7.0
    s.reserve(300)
    assert s.capacity == 512 and float(s.k[1][3, :, :4].mean()) == 7.0 and s.k[1].dtype == torch.bfloat16
