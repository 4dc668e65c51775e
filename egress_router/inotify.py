"""Wake-ups when a watched file's directory changes (inotify through libc), so a reload need not wait
for the next poll. sources.FileWatch stays the judge of what changed; this only says "look now"."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

IN_CLOEXEC = 0o2000000
# a ConfigMap update renames a new `..data` symlink into the directory; editors write or rename-replace
EVENTS = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200  # MODIFY ATTRIB CLOSE_WRITE MOVED_FROM MOVED_TO CREATE DELETE


def start(paths: Iterable[str], wake: Callable[[], None]) -> bool:
    """Watch the directories of `paths` in a daemon thread that calls `wake` after each batch of events;
    False (and polling alone) where inotify is not available."""
    directories = sorted({os.path.dirname(os.path.abspath(path)) for path in paths})
    if not directories:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        for directory in directories:
            if libc.inotify_add_watch(fd, directory.encode(), EVENTS) < 0:
                error = ctypes.get_errno()
                os.close(fd)
                raise OSError(error, f"{directory}: {os.strerror(error)}")
    except (OSError, AttributeError) as exc:
        log.debug("No inotify (%s): the rule files are polled every 0.5 s only", exc)
        return False
    threading.Thread(target=_read, args=(fd, wake), name="inotify", daemon=True).start()
    return True


def _read(fd: int, wake: Callable[[], None]) -> None:
    while True:
        try:
            if not os.read(fd, 64 * 1024):
                return
        except OSError:
            return
        wake()
