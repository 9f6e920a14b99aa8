"""The C heap's hold on freed memory (glibc only; elsewhere these do nothing).

numpy and onnxruntime free large arrays often during a run. glibc serves allocations above its mmap
threshold with `mmap` and returns them on free, but it raises that threshold (up to 32 MB) each time such
a block is freed, so later large arrays come from the heap, whose freed pages stay resident.
"""
from __future__ import annotations

import ctypes

#: glibc's `mallopt` parameter number of M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: allocations from this size up get their own mapping (and go back to the system when freed)
MMAP_THRESHOLD_BYTES = 1 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep glibc's mmap threshold at `threshold` bytes for the rest of the process (setting it switches the
    dynamic raise off). Process-wide, so the CLI sets it, not the library.

    CLI prune 0.3 + W6, peak RSS of the process: MobileNetV2 454 -> 426 MB, ResNet-50-sized 880-930 ->
    664 MB at 8% more time (12.7-13.1 -> 13.7-14.3 s, alternating runs; at 128 KB 15% more). Quantization
    alone gains nothing from it (ResNet-50-sized W6 469 -> 462 MB) and runs 35% longer (4.4-5.4 -> 6.0-7.2 s:
    every large temporary of the rounding is mapped, faulted in and unmapped), so the CLI sets it for pruning
    runs only. Returns whether it was set.
    """
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except AttributeError:
        return False


def return_freed_memory() -> None:
    """Give the free pages of the C heap back to the system (glibc's `malloc_trim`).

    onnxruntime frees the probe's feature maps into the heap, and glibc keeps most of them resident:
    MobileNetV2 prune 0.3 held 357 MB after sampling, 200 MB after the trim, and the peak of the greedy
    allocation that follows fell by as much (524 -> 448 MB).
    """
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
