"""Peak extra memory of a CPU call, from the kernel's resident-set high-water mark (Linux).

PyTorch's CPU allocator keeps no statistics, but blocks of at least glibc's mmap threshold are
mmap-ed and returned to the kernel on free, so the resident set tracks them. ``fix_mmap_threshold``
pins that threshold (glibc raises it dynamically up to 32 MiB after large frees, after which freed
heap would be reused unseen); ``peak_rss_bytes`` resets the peak mark (``/proc/self/clear_refs``),
runs the function and returns ``VmHWM − VmRSS before``: the extra memory it needed, outputs included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation of ``nbytes`` or more by its own mmap (glibc); False where glibc is absent.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed; later
    blocks below it come from the heap, where a freed block stays resident and is reused without
    growing the resident set, so the peak would miss it. ``mallopt(M_MMAP_THRESHOLD, n)`` fixes the
    threshold: every tensor of ``nbytes`` or more is mapped on allocation and unmapped on free, and
    VmHWM − VmRSS is the peak of live tensors, as ``torch.cuda.max_memory_allocated`` is on a GPU.
    Call it once, before all measurements, so every provider runs under the same policy."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):
        return False


def peak_rss_bytes(fn: Callable[[], object]) -> int:
    """Extra peak resident memory (bytes) of one call of ``fn`` beyond what is resident before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024
