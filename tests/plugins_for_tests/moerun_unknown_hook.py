"""Implements a hook moerun does not define (a typo): reported, left out."""

from moerun import hookimpl


@hookimpl
def moerun_register_backend(registry):  # missing 's'
    pass
