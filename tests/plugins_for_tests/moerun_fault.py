"""A backend that misbehaves on purpose: segfault, hang, raise, or run like torch.

Selected per point with the option ``mode`` (``-O mode=segfault``). Loaded through
``MOERUN_PLUGINS=moerun_fault`` so that child processes load it too.
"""

from __future__ import annotations

import ctypes
import time

from moerun.backends.torch.backend import TorchBackend
from moerun.toolkit import Option, hookimpl


class FaultBackend(TorchBackend):
    name = "fault"
    aliases = ()
    description = "test backend that crashes, hangs or raises on request"
    options = {
        **TorchBackend.options,
        "mode": Option(help="how to misbehave at load", choices=("ok", "segfault", "hang", "raise", "exit", "sigkill",
                                                                  "oom")),
        "hang_while": Option(help="hang at load while this file exists", kinds=(str,)),
        "hang_model": Option(help="the model whose load hangs", kinds=(str,)),
        "hang_if_env": Option(help="hang only where this environment variable is set", kinds=(str,)),
        "crash_model": Option(help="the model whose decode segfaults", kinds=(str,)),
        "crash_after": Option(help="decode calls before it does", kinds=(int,)),
    }

    def load(self, artifact, settings):
        mode = settings.options.get("mode", "ok")
        gate = settings.options.get("hang_while")
        only = settings.options.get("hang_if_env")  # hang only where this variable is set (one fleet node)
        import os

        if gate and artifact.spec.name == settings.options.get("hang_model") and (not only or os.environ.get(only)):
            from pathlib import Path

            Path(gate + ".pid").write_text(str(os.getpid()))  # the test checks this process dies
            while Path(gate).exists():  # hang, as long as the test keeps the gate file
                time.sleep(0.1)
        if mode == "segfault":
            ctypes.string_at(0)  # SIGSEGV in this process
        if mode == "hang":
            time.sleep(3600)
        if mode == "raise":
            raise RuntimeError("engine exploded on purpose")
        if mode == "exit":
            import os

            os._exit(3)
        if mode == "sigkill":  # what the kernel's out-of-memory killer does
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "oom":  # allocate until the point's memory limit stops it
            hoard = []
            while True:
                hoard.append(bytearray(64 << 20))
        session = super().load(artifact, settings)  # torch reads only its own options
        if settings.options.get("crash_model") == artifact.spec.name:  # segfault after N decode calls
            left = [int(settings.options.get("crash_after", 0))]
            decode = session.decode

            def crashing_decode(token):
                left[0] -= 1
                if left[0] < 0:
                    ctypes.string_at(0)
                return decode(token)

            session.decode = crashing_decode
        return session


@hookimpl
def moerun_register_backends(registry):
    registry.add(FaultBackend)
