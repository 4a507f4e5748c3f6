"""Keep freed memory in the process for reuse (glibc's allocator, opt-in).

On the CPU, PyTorch takes every new tensor from the C allocator. glibc serves a large request
(above a threshold that starts at 128 KiB) with a fresh ``mmap`` and returns the memory to the
kernel when it is freed, and it trims the top of its heap back to the kernel too. A training
step of certified training allocates the same full-size tensors again at every step (the
interval pass keeps clean, centre and radius activations for the backward pass), and each one
then costs its page faults again. Keeping freed memory in the process avoids them: on the
benchmark CNN teacher, an IBP step took about 12 % less time (``python
benchmarks/bench_train.py --retain-freed-memory``; docs/benchmarks.md has the figures), a plain
step about the same. PyTorch's CPU tuning guide gives the same advice in the form of jemalloc or
tcmalloc.

The setting is global to the process and holds on to the memory of its largest step, so it is
never applied implicitly: call :func:`retain_freed_memory` once, at the start of a training
script.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc ignores an mmap threshold above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit systems.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def retain_freed_memory() -> bool:
    """Serve requests below 32 MiB from the heap and trim it only above 1 GiB free (glibc).

    Returns
    -------
    bool
        True when glibc accepted both settings; False where the C library is not glibc (macOS,
        Windows, musl), in which case nothing changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success and 0 on error.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
