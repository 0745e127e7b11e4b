"""Hand the kernel back what a replica no longer uses, so that it holds one copy of the weights.

A compiled backend repacks the weights into its own layout while it compiles and on its first
inference; the artefact it read them from stays mapped (OpenVINO maps the IR and its blob
cache) and, once read, resident, though never read again: a second copy in the replica's RSS.
`page_out` asks the kernel to reclaim those pages (MADV_PAGEOUT): clean pages of a file, so
nothing is lost, and a page read again later is simply read from the file again. `trim_heap`
returns the heap that freed tensors leave to the C library (malloc_trim): after a backend's
conversion, a swap or a release.

Linux only (MADV_PAGEOUT since 5.4); elsewhere both do nothing and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman.h


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _mappings(root: Path) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of this process's mappings of files under `root`."""
    root_name = str(root.resolve())
    found = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and (parts[5] == root_name or parts[5].startswith(root_name + "/")):
            start, end = (int(address, 16) for address in parts[0].split("-"))
            found.append((start, end, parts[1]))
    return found


def page_out(root: str | Path) -> int:
    """Ask the kernel to reclaim the resident pages of read-only mappings of files under
    `root`; the bytes asked for (0 where the kernel or platform cannot)."""
    libc = _libc()
    if libc is None:
        return 0
    asked = 0
    for start, end, permissions in _mappings(Path(root)):
        if "w" in permissions:  # a page written through this mapping is not the file's
            continue
        if libc.madvise(start, end - start, MADV_PAGEOUT) != 0:
            logger.info("madvise(MADV_PAGEOUT) refused (errno %d): pages stay resident",
                        ctypes.get_errno())
            return asked
        asked += end - start
    return asked


def trim_heap() -> None:
    """Hand glibc's free lists back to the OS (freed tensors otherwise stay in the RSS)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc: it keeps what it keeps
        libc.malloc_trim(0)


def release() -> None:
    """Collect what reference cycles hold, then trim the heap."""
    gc.collect()
    trim_heap()


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
