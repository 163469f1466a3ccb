"""Packaging: the package map matches the folders, and `import moerun` loads no engine."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = {"core": "moerun", "backends": "moerun.backends", "plugins": "moerun.plugins"}


def test_package_list_matches_folders():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in MAP.items()}
    on_disk = set()
    for folder, package in MAP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert set(cfg["packages"]) == on_disk


def test_import_moerun_loads_no_engine():
    code = ("import sys, moerun, moerun.cli, moerun.study, moerun.backends.torch, moerun.plugins.reporters;"
            "moerun.get_plugin_manager();"
            "print(','.join(m for m in ('torch','onnx','onnxruntime','llama_cpp','tensorrt','gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_console_script_installed():
    exe = Path(sys.executable).with_name("moerun")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("moerun ")
