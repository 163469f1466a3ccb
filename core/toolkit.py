"""What a backend may use of moerun: the whole published surface for engine plugins, in-tree
and third-party alike (docs/plugins.md, "The backend toolkit"). A backend imports from here
(and from its own package); nothing else in moerun is promised to stay where it is.
tests/test_architecture.py holds the in-tree backends to it.

- the contract: `Backend`, `Session`, `Capabilities`, `Availability`, `Artifact`,
  `LoadSettings`, `Option` (options declared as data, checked by the core before loading),
  `check_step` (the one input check of a prefill or decode step), `hookimpl`;
- the model: `ModelSpec`, `Checkpoint` (safetensors in the Hugging Face layout), `Cache`,
  `to_bf16_bits` (float32 -> bfloat16 bits, rounded to nearest even, as checkpoints store them);
- errors: `ConfigError` (bad input), `UnsupportedError`, `BackendRuntimeError`,
  `BackendUnavailableError`, `CheckpointError`;
- timing helpers: `CATEGORIES`, `cut_points`, `cut_timing`, `empty_breakdown`, `time_phases`
  (a per-op breakdown by cut timing, moerun.breakdown);
- machine helpers: `release_free` (hand freed heap back to the OS after a load), `advise`
  (madvise a mapped weights file: how page faults read it under a memory cap),
  `compile_library` (a small C helper built once into the cache), `cpu_flags`.
"""

from .backend import (
    Artifact,
    Availability,
    Backend,
    Capabilities,
    LoadSettings,
    Option,
    Session,
    check_step,
)
from .breakdown import CATEGORIES, cut_points, cut_timing, time_phases
from .breakdown import empty as empty_breakdown
from .cache import Cache
from .checkpoint import Checkpoint, to_bf16_bits
from .environment import cpu_flags
from .errors import (
    BackendRuntimeError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    UnsupportedError,
)
from .hookimpl import hookimpl
from .memory import advise, release_free
from .native import compile_library
from .spec import ModelSpec

__all__ = [
    "Artifact", "Availability", "Backend", "BackendRuntimeError", "BackendUnavailableError", "CATEGORIES", "Cache",
    "Capabilities", "Checkpoint", "CheckpointError", "ConfigError", "LoadSettings", "ModelSpec", "Option", "Session",
    "UnsupportedError", "advise", "check_step", "compile_library", "cpu_flags", "cut_points", "cut_timing", "empty_breakdown",
    "hookimpl", "release_free", "time_phases", "to_bf16_bits",
]
