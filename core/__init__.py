"""moerun: does Mixture-of-Experts actually help inference on this hardware?

The public API. Importing it loads no inference engine (torch, onnxruntime, llama_cpp,
tensorrt); backends import theirs lazily.
"""

__version__ = "0.1.0"

from .backend import Artifact, Availability, Backend, Capabilities, LoadSettings, Session
from .cache import Cache
from .checkpoint import Checkpoint, synthetic_checkpoint, write_synthetic
from .errors import (
    BackendRuntimeError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    MoerunError,
    PluginLoadError,
    UnknownBackendError,
    UnknownModelError,
    UnsupportedError,
)
from .hookimpl import hookimpl
from .manager import get_plugin_manager
from .precision import PRECISIONS, get_precision
from .isolation import run_isolated
from .parity import teacher_forced_logits
from .point import Point, token_ids
from .runner import measure
from .spec import FAMILIES, ModelSpec

__all__ = [
    "Artifact", "Availability", "Backend", "BackendRuntimeError", "BackendUnavailableError", "Cache",
    "Capabilities", "Checkpoint", "CheckpointError", "ConfigError", "FAMILIES", "LoadSettings",
    "ModelSpec", "MoerunError", "PRECISIONS", "PluginLoadError", "Point", "Session",
    "UnknownBackendError", "UnknownModelError", "UnsupportedError", "__version__", "get_plugin_manager",
    "get_precision", "hookimpl", "measure", "run_isolated", "synthetic_checkpoint", "teacher_forced_logits",
    "token_ids",
    "write_synthetic",
]
