"""Docs follow the code: every hook documented with its exact parameters; the CLI reference
holds what `moerun --help` prints."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import moerun.hookspecs as hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hookspecs():
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("moerun_")}


def test_every_hook_is_documented_with_its_signature():
    text = (DOCS / "plugins.md").read_text()
    documented = dict(re.findall(r"^### `(moerun_\w+)\(([^)]*)\)`", text, flags=re.M))
    specs = _hookspecs()
    assert set(documented) == set(specs)
    for name, fn in specs.items():
        params = ", ".join(inspect.signature(fn).parameters)
        assert documented[name] == params, f"{name}: docs say ({documented[name]}), spec has ({params})"
        assert fn.__doc__ and ":param" in fn.__doc__ and ":return:" in fn.__doc__, f"{name} docstring"
        section = text.split(f"### `{name}(")[1].split("\n### ")[0]
        assert "```python" in section and "@hookimpl" in section, f"{name} has no example"


def test_cli_reference_matches_help_output():
    exe = Path(sys.executable).with_name("moerun")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "100"}).stdout
    text = (DOCS / "cli.md").read_text()
    block = text.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert block.strip() == out.strip()


def test_readme_commands_exist_and_ci_calls_the_test_command():
    root = DOCS.parent
    readme = (root / "README.md").read_text()
    assert "./scripts/run" in readme and "./scripts/test" in readme
    assert os.access(root / "scripts" / "run", os.X_OK) and os.access(root / "scripts" / "test", os.X_OK)
    assert "./scripts/test" in (root / ".ci" / "run").read_text()
