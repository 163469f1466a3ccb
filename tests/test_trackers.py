"""Trackers: RSS sampling for real; RAPL against a powercap tree laid out as Linux writes it."""

from __future__ import annotations

import pytest

from moerun.plugins.trackers import RaplTracker, RssTracker, read_rapl


def test_rss_tracker_sees_an_allocation():
    t = RssTracker()
    t.start()
    import time

    block = bytearray(64 << 20)  # 64 MiB touched
    block[::4096] = b"x" * len(block[::4096])
    time.sleep(0.05)
    out = t.stop()
    del block
    assert out["available"] and out["samples"] >= 3
    assert out["peak_bytes"] >= out["mean_bytes"] > 0
    assert out["peak_bytes"] > 64 << 20


def _zone(root, idx, name, energy, wrap=262143328850):
    z = root / f"intel-rapl:{idx}"
    z.mkdir(parents=True, exist_ok=True)
    (z / "name").write_text(f"{name}\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{wrap}\n")
    return z


def test_rapl_counts_joules_and_handles_wraparound(tmp_path):
    z0 = _zone(tmp_path, 0, "package-0", 1_000_000)
    z1 = _zone(tmp_path, 1, "package-1", 262143328850 - 500_000)
    _zone(tmp_path / "intel-rapl:0", 0, "core", 5)  # subzones are not summed
    t = RaplTracker(str(tmp_path))
    t.start()
    (z0 / "energy_uj").write_text("3500000\n")  # +2.5 J
    (z1 / "energy_uj").write_text("1500000\n")  # wrapped: +2.0 J
    out = t.stop()
    assert out["available"]
    assert out["zones_joules"] == {"package-0:intel-rapl:0": 2.5, "package-1:intel-rapl:1": 2.0}
    assert out["joules"] == pytest.approx(4.5)


def test_rapl_absent_or_unreadable_says_why(tmp_path):
    t = RaplTracker(str(tmp_path / "none"))
    t.start()
    out = t.stop()
    assert out == {"available": False, "reason": f"no RAPL powercap zones under {tmp_path / 'none'}"}
    z = _zone(tmp_path, 0, "package-0", 1)
    (z / "energy_uj").chmod(0)
    zones, reason = read_rapl(str(tmp_path))
    import os

    if os.geteuid() == 0:  # root reads anything: the permission case cannot be shown here
        assert zones and reason is None
    else:
        assert "not readable" in reason


def test_measurement_carries_tracker_results(plugins, cache):
    from moerun import Point, measure

    r = measure(Point(model="tiny-dense", backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1),
                plugins, cache, {"bandwidth_bytes_s": 20e9})
    assert r["status"] == "ok"
    assert r["trackers"]["rss"]["available"] and r["trackers"]["rss"]["peak_bytes"] > 0
    assert set(r["trackers"]) == {"rss", "rapl"}
    assert "available" in r["trackers"]["rapl"]
