"""The plugin manager: defaults, env plugins, entry points, load errors, duplicates."""

from __future__ import annotations

import textwrap

import pytest

from moerun import ConfigError, PluginLoadError, UnknownBackendError, get_plugin_manager
from moerun.registry import BackendRegistry


def test_defaults_register_torch_presets_and_reporters(plugins):
    assert "torch" in plugins.backends and "pytorch" in plugins.backends
    assert plugins.backends.primary_names() == ["torch", "llamacpp", "onnxruntime", "onnxruntime-contrib", "tensorrt"]
    assert "tiny-moe" in plugins.models and "olmoe-1b-7b" in plugins.models
    assert {"table", "json", "csv"} <= set(plugins.reporters)
    assert {"rss", "rapl"} <= set(plugins.trackers)
    assert plugins.load_errors == []
    assert plugins.backends.owner("torch") == "moerun.backends.torch"


def test_failing_plugin_is_recorded_not_fatal(test_plugin_env):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_broken,moerun_fault")
    pm = get_plugin_manager(entrypoints=False)
    assert "fault" in pm.backends  # the good one still loads
    (err,) = pm.load_errors
    assert err.name == "moerun_broken" and "broken on purpose" in err.error


def test_strict_mode_makes_load_errors_fatal(test_plugin_env):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_broken")
    with pytest.raises(PluginLoadError, match="moerun_broken"):
        get_plugin_manager(entrypoints=False, strict=True)


def test_duplicate_backend_name_names_both_plugins(test_plugin_env):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_dup")
    pm = get_plugin_manager(entrypoints=False)
    (err,) = pm.load_errors
    assert "'torch' registered twice" in err.error
    assert "moerun.backends.torch" in err.error and "moerun_dup" in err.error
    assert pm.backends.get("torch").__module__ == "moerun.backends.torch.backend"  # first owner kept


def test_unknown_hook_is_reported_and_the_plugin_left_out(test_plugin_env):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_unknown_hook")
    pm = get_plugin_manager(entrypoints=False)
    (err,) = pm.load_errors
    assert "moerun_register_backend" in err.error
    assert not pm.pm.has_plugin("moerun_unknown_hook")


def test_disable_plugins_blocks_by_name(monkeypatch):
    monkeypatch.setenv("MOERUN_DISABLE_PLUGINS", "moerun.backends.torch")
    pm = get_plugin_manager(entrypoints=False)
    assert "torch" not in pm.backends
    with pytest.raises(UnknownBackendError, match="unknown backend 'torch'"):
        pm.backends.get("torch")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    # a dummy installed distribution: a module plus its dist-info with an entry point
    (tmp_path / "moerun_ep_demo.py").write_text(textwrap.dedent('''
        from moerun import hookimpl, ModelSpec

        @hookimpl
        def moerun_register_models(registry):
            registry.add(ModelSpec(name="ep-demo", family="llama", vocab_size=64, hidden_size=16,
                                   num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                   intermediate_size=32))
    '''))
    info = tmp_path / "moerun_ep_demo-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moerun-ep-demo\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[moerun]\nepdemo = moerun_ep_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(entrypoints=True)
    assert "ep-demo" in pm.models
    (info_row,) = [p for p in pm.plugins if p.name == "epdemo"]
    assert (info_row.source, info_row.distribution, info_row.version) == ("entrypoint", "moerun-ep-demo", "1.2.3")
    assert info_row.hooks == ("moerun_register_models",)
    blocked = get_plugin_manager(entrypoints=True, blocked=["epdemo"])
    assert "ep-demo" not in blocked.models


def test_registry_rejects_non_backends():
    reg = BackendRegistry()
    with pytest.raises(ConfigError, match="takes a Backend subclass"):
        reg.add(object)


def test_unknown_backend_error_lists_available_ones(plugins):
    with pytest.raises(UnknownBackendError) as exc:
        plugins.backends.get("nope")
    assert "available: torch" in str(exc.value)


def test_example_third_party_backend_registers_through_its_entry_point():
    pytest.importorskip("moerun_example_backend", reason="examples/moerun-example-backend is not installed")
    pm = get_plugin_manager(entrypoints=True)
    (row,) = [p for p in pm.plugins if p.name == "example-numpy"]
    assert (row.source, row.distribution) == ("entrypoint", "moerun-example-backend")
    assert "numpy" in pm.backends
    assert not pm.backends.get("numpy").capabilities.in_default_study
    from moerun.grid import select_backends

    chosen, _ = select_backends(pm, None)
    assert "numpy" not in chosen and select_backends(pm, ["numpy"])[0] == ["numpy"]
