"""Shared fixtures. Every test uses a private cache folder; no test touches ~/.cache."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TEST_PLUGINS = HERE / "plugins_for_tests"

# One cache for the whole session (synthetic checkpoints are reused across tests), also
# seen by the `moerun` child processes the tests start.
_CACHE = Path(tempfile.mkdtemp(prefix="moerun-test-cache-"))
atexit.register(shutil.rmtree, _CACHE, True)  # ~650 MB of checkpoints and artifacts per run
os.environ["MOERUN_CACHE_DIR"] = str(_CACHE)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_CACHE / "inductor")
os.environ.setdefault("MOERUN_BANDWIDTH_GBPS", "20")  # tests need a figure, not a measurement
os.environ.setdefault("MOERUN_PEAK_GFLOPS", "150")
os.environ.setdefault("MOERUN_STORAGE_GBPS", "0.5")
os.environ.setdefault("MOERUN_BREAKDOWN_BUDGET_S", "3")  # cut timing: fewer repetitions of slow steps
os.environ.pop("MOERUN_PLUGINS", None)
# the same points on every machine: keep torch's bf16 iso-memory twin where the CPU emulates bf16
# (tests/test_lockstep.py checks the rule itself with this unset)
os.environ["MOERUN_EMULATED_TWINS"] = "1"
os.environ.pop("MOERUN_DISABLE_PLUGINS", None)


@pytest.fixture(scope="session")
def cache():
    from moerun import Cache

    return Cache(_CACHE)


@pytest.fixture
def plugins():
    """A fresh plugin manager with entry points off."""
    from moerun import get_plugin_manager

    return get_plugin_manager(entrypoints=False)


@pytest.fixture
def test_plugin_env(monkeypatch):
    """Make the test-only plugins importable here and in child processes."""
    path = os.pathsep.join(filter(None, [str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    return monkeypatch


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run the real `moerun` console script; returns CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).with_name("moerun")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def onnxruntime_with_formulation(formulation: str):
    """The onnxruntime backend held to one MoE formulation at any expert size (the tiny
    presets' experts are small enough that the backend itself picks the gather one)."""
    from moerun.backends.onnxruntime.backend import OnnxRuntimeBackend

    class Fixed(OnnxRuntimeBackend):
        name = f"onnxruntime-{formulation}"
        aliases = ()

        def moe_formulation(self, spec):
            return formulation

    return Fixed()
