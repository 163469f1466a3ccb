"""The marker plugin authors use: ``from moerun import hookimpl``."""

import pluggy

hookimpl = pluggy.HookimplMarker("moerun")
