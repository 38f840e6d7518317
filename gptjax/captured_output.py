"""Keeping what a library's threads print out of the console, for a report file instead.

The checkpoint library (orbax, tensorstore) writes and reads from threads
of its own and prints a traceback per thread when the disk is full or a
checkpoint is damaged; these capture it, so that a user sees our one clear
line and the library's detail stays available in a file.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time


class _StderrByThread:
    """sys.stderr while a write is in flight: the main thread's text to the console, other threads' to `others`."""

    def __init__(self, main, others):
        self._main, self._others = main, others

    def _target(self):
        return self._main if threading.current_thread() is threading.main_thread() else self._others

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._main.flush()
        self._others.flush()

    def __getattr__(self, name):
        return getattr(self._main, name)


class LibraryOutput:
    """What the checkpoint library prints while a write is in flight, held in a temporary file.

    Orbax and tensorstore write from their own threads; a failing write (a
    full disk) makes each of them print a traceback, burying the one clear
    line the run ends with. While started, file descriptor 2 (native writers
    and Python's original stderr) and other threads' Python writes go to the
    file; the main thread's own messages still reach the console at once.
    `stop(replay=True)` shows what was held (a healthy write prints nothing),
    `stop(replay=False)` returns it for the failure report instead.
    """

    def __init__(self):
        self._file = None
        self._saved_fd: int | None = None
        self._saved_stderr = None
        self._console = None

    def start(self) -> None:
        if self._file is not None:
            return
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved_fd = os.dup(2)
        self._console = open(os.dup(self._saved_fd), "w", encoding="utf-8", errors="replace", buffering=1)
        os.dup2(self._file.fileno(), 2)
        self._saved_stderr = sys.stderr
        sys.stderr = _StderrByThread(self._console, self._saved_stderr)

    def text_so_far(self) -> str:
        if self._file is None:
            return ""
        self._saved_stderr.flush()
        self._file.flush()
        return _read_all(self._file)

    def settle(self, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
        """Wait until nothing new has been printed for `quiet_s` (at most `limit_s`)."""
        if self._file is None:
            return
        end, size, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < end:
            self._saved_stderr.flush()
            now_size = os.fstat(self._file.fileno()).st_size
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.05)

    def move_to(self, path: str) -> bool:
        """Rewrite `path` with what was held, and send what follows there too (False if it cannot be written)."""
        try:
            text = self.text_so_far()
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            report = open(path, "a+b")
        except OSError:
            return False
        self._saved_stderr.flush()
        os.dup2(report.fileno(), 2)
        self._file.close()
        self._file = report
        return True

    def stop(self, replay: bool) -> str:
        if self._file is None:
            return ""
        gc.collect()  # abandoned writer coroutines report while being collected: inside the capture
        self._saved_stderr.flush()
        sys.stderr = self._saved_stderr
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._console.close()
        text = _read_all(self._file)
        self._file.close()
        self._file = self._saved_fd = self._saved_stderr = self._console = None
        if replay and text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return text


def _read_all(f) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


class captured_stderr:
    """Redirect file descriptor 2 (Python and native writers alike) to a temporary file."""

    def __enter__(self):
        self.text = ""
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        gc.collect()  # abandoned reader coroutines report while being collected: inside the capture
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False
