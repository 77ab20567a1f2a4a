"""Host memory for the large tensors a CPU decode step walks end to end: the K/V caches
(engine/kv_cache.py) and the quantized weights (model/quant.py), each set in one block asked to be backed
by 2 MB pages (Linux's transparent huge pages, madvise).

Why: a decode step streams every weight byte and every cached K/V byte once. Over 4 KB pages that walk
misses the TLB every 4 KB, and the hardware prefetchers stop at each 4 KB boundary. Measured on SmolLM2 int4,
compiled, in one process with the same values in both kinds of memory (benchmarks/hugepages.py;
benchmarks/README.md, "eighth session" and "eleventh session"): the weights in 2 MB pages made a batch-1
step 1.06-1.17x faster than in 4 KB ones, the K/V caches 1.02x (batch 8: 1.03-1.10x and 1.03-1.08x)."""
from __future__ import annotations

import functools
import mmap
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import PicochatError

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each tensor of a shared block starts on a 4 KB page (the kernels need 64 bytes)


@functools.lru_cache(maxsize=1)
def huge_pages_available() -> bool:
    """Linux with transparent huge pages that a program may ask for (`always` or `madvise`, not `never`), and
    PICOCHAT_HUGE_PAGES not 0 (a host whose THP `defrag` setting compacts memory when a page is first
    touched can stall a load or a cache's growth: the switch turns the request off, for the K/V caches and
    the quantized weights alike)."""
    switch = os.environ.get("PICOCHAT_HUGE_PAGES", "1")
    if switch not in ("0", "1"):
        raise PicochatError(f"PICOCHAT_HUGE_PAGES={switch!r}: use 1 (ask for huge pages where the kernel allows, "
                            "the default) or 0 (never)")
    if switch == "0":
        return False
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def wants_huge(nbytes: int, on_cpu: bool, huge: Optional[bool]) -> bool:
    """Whether `nbytes` of memory should be a huge_block: huge=None decides (2 MB or more, on a CPU where
    huge_pages_available()), True insists (refused by name where it cannot be had), False never asks."""
    if huge is None:
        return on_cpu and nbytes >= HUGE_PAGE and huge_pages_available()
    if huge and nbytes and (not on_cpu or not huge_pages_available()):
        raise PicochatError("huge pages are for CPU tensors on Linux with transparent huge pages not set to never "
                            "(and PICOCHAT_HUGE_PAGES not 0)")
    return huge and nbytes > 0


def huge_block(nbytes: int) -> torch.Tensor:
    """`nbytes` zero bytes (uint8, CPU) starting on a 2 MB boundary, asked to be backed by 2 MB pages. The
    mapping lives as long as a view of the tensor does."""
    # anonymous memory is zero-filled by the kernel; one page more, to start the block on a 2 MB boundary
    block = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,
                      flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # (refused: the block stays in ordinary pages, which is all it costs)
        pass
    raw = torch.frombuffer(block, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]


def in_huge_pages(tensors: list[torch.Tensor], huge: Optional[bool] = None) -> list[torch.Tensor]:
    """Copies of CPU `tensors` side by side in one huge_block, each starting on a 4 KB page; or the tensors
    themselves where huge pages are not to be had (huge=None: 2 MB or more in all, on a Linux CPU that
    allows them; True insists, False never asks)."""
    def size(t):
        return -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    total = sum(size(t) for t in tensors)
    if not wants_huge(total, all(t.device.type == "cpu" for t in tensors), huge):
        return list(tensors)
    block, out, at = huge_block(total), [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        copy = block[at:at + n].view(t.dtype).view(t.shape)
        copy.copy_(t)
        out.append(copy)
        at += size(t)
    return out
