"""Small C helpers compiled once with the system C compiler into moerun's cache and loaded
with ctypes (the llama.cpp cut callback, the bandwidth probe's read kernel). None where no
compiler is found or the build fails: every user has a fallback and says which it used."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Sequence


def compile_library(source: str, name: str, cache_root: Path, flags: Sequence[str] = ("-O2",)) -> ctypes.CDLL | None:
    """`source` built as a shared library under `cache_root`/native, keyed by its text and
    flags (built once per cache); None when it cannot be built or loaded."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = shutil.which(cc.split()[0]) or shutil.which("cc") or shutil.which("gcc")
    tag = hashlib.sha256((source + sys.platform + " ".join(flags)).encode()).hexdigest()[:16]
    lib_path = Path(cache_root) / "native" / f"{name}-{tag}.so"
    if not lib_path.exists():
        if cc is None:
            return None
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        src = lib_path.with_suffix(f".{os.getpid()}.c")
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        try:
            src.write_text(source)
            done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(src)],
                                  capture_output=True, timeout=120)
            if done.returncode != 0:
                return None
            os.replace(tmp, lib_path)
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    try:
        return ctypes.CDLL(str(lib_path))
    except OSError:
        return None
