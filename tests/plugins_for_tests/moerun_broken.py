"""A plugin that fails at import: it must be reported, never fatal."""

raise ImportError("this plugin is broken on purpose")
