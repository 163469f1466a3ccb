"""The on-disk cache: synthetic checkpoints and backend artifacts, keyed by content."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import attrs


def default_cache_root() -> Path:
    env = os.environ.get("MOERUN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moerun"


@attrs.frozen
class Cache:
    root: Path = attrs.field(factory=default_cache_root, converter=Path)

    def artifact_dir(self, backend: str, *key_parts: object) -> Path:
        """Folder for one backend artifact; the key hashes everything that determines it."""
        digest = hashlib.sha256("\x00".join(map(str, key_parts)).encode()).hexdigest()[:20]
        return self.root / "artifacts" / backend / digest

    @contextmanager
    def building(self, final: Path) -> Iterator[Path]:
        """Yield a temporary folder to build into; it becomes `final` only on success,
        so an interrupted or failed build is never mistaken for a cached artifact. A stale
        `final` (its caller found the artifact missing in it) is replaced."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            yield tmp
            if final.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=final.parent))
                os.replace(final, stale / "old")
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
