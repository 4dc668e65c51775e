"""Wake-ups when a watched file's directory changes (inotify through libc), so a reload need not wait for
the next poll. sources.FileWatch stays the judge of what changed; this only says "look now".

No thread: the kernel signals the process (O_ASYNC with F_SETSIG) when events arrive, and the loops that
wait with sigtimedwait wait for that signal too; an asyncio loop reads the descriptor instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# a ConfigMap update renames a new `..data` symlink into the directory; editors write or rename-replace
# not IN_MODIFY: a file written in place is looked at once its writer closes it (IN_CLOSE_WRITE)
EVENTS = 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200  # ATTRIB CLOSE_WRITE MOVED_FROM MOVED_TO CREATE DELETE


class Notifier:
    """An inotify descriptor watching the directories of some files."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls, paths: Iterable[str]) -> Notifier | None:
        """A notifier for the directories of `paths`; None (polling alone) without paths or inotify."""
        directories = sorted({os.path.dirname(os.path.abspath(path)) for path in paths})
        if not directories:
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            for directory in directories:
                if libc.inotify_add_watch(fd, directory.encode(), EVENTS) < 0:
                    error = ctypes.get_errno()
                    os.close(fd)
                    raise OSError(error, f"{directory}: {os.strerror(error)}")
        except (OSError, AttributeError) as exc:
            log.debug("No inotify (%s): the rule files are polled every 0.5 s only", exc)
            return None
        return cls(fd)

    def signal_on_events(self, signo: int) -> None:
        """Have the kernel send `signo` to this process whenever events arrive."""
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self.fd, fcntl.F_SETSIG, signo)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)

    def drain(self) -> bool:
        """Read every queued event; whether there were any."""
        seen = False
        while True:
            try:
                if not os.read(self.fd, 64 * 1024):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError:
                return seen

    def close(self) -> None:
        os.close(self.fd)
