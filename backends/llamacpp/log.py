"""llama.cpp's library handle and its log: the backend is initialised once per process, and
the log goes to a small ring buffer (its last lines explain a failed load or step) instead of
stderr; `capture_log` collects the whole log while a call runs (the offload read-back parses
it). MOERUN_LLAMA_LOG=1 leaves llama.cpp's own logging on."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any


def library():
    import llama_cpp

    return llama_cpp


_LOG_LOCK = threading.Lock()
_LOG_TAIL: list[str] = []
_LOG_CB = None  # keep the ctypes callback alive
_INIT = False


def init_llama() -> None:
    """Backend init once per process; llama.cpp's log goes to a small ring buffer (its last
    errors explain a failed load) instead of flooding stderr."""
    global _INIT, _LOG_CB
    if _INIT:
        return
    llama = library()

    @llama.llama_log_callback
    def _log(level: int, text: bytes, _user: Any) -> None:
        if text:
            line = text.decode(errors="replace").rstrip()
            with _LOG_LOCK:
                _LOG_TAIL.append(line)
                del _LOG_TAIL[:-40]
                for capture in _LOG_CAPTURE:
                    capture.append(line)

    _LOG_CB = _log
    if not os.environ.get("MOERUN_LLAMA_LOG"):
        llama.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    llama.llama_backend_init()
    _INIT = True


_LOG_CAPTURE: list[list[str]] = []  # open captures: every log line goes to each, too


class capture_log:
    """Collect llama.cpp's whole log while a call runs (the ring buffer keeps only the tail)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        with _LOG_LOCK:
            _LOG_CAPTURE.append(self.lines)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        with _LOG_LOCK:
            _LOG_CAPTURE.remove(self.lines)


def log_tail(n: int = 3) -> str:
    with _LOG_LOCK:
        lines = [ln for ln in _LOG_TAIL if ln.strip()]
    return " | ".join(lines[-n:])
