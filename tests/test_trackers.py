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
    assert {"rss", "rapl", "nvml", "tegrastats", "powermetrics", "torch_cuda", "torch_mps"} == set(r["trackers"])
    import torch

    if not torch.backends.mps.is_available():
        assert r["trackers"]["torch_mps"] == {"available": False,
                                              "reason": "no MPS memory in use by torch in this measurement"}
    assert "available" in r["trackers"]["rapl"]


# Lines as the tools print them (Jetson Orin Nano / JetPack 6, Xavier NX / JetPack 5,
# Nano / JetPack 4; macOS powermetrics --samplers cpu_power).
ORIN = ("08-23-2023 10:42:21 RAM 2348/7620MB (lfb 1185x4MB) SWAP 0/3810MB (cached 0MB) "
        "CPU [1%@729,0%@729,0%@729,0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] VIC_FREQ 729 "
        "APE 200 CV0@44.5C CPU@45.968C SOC2@44.562C GPU@44.375C tj@46.031C VDD_IN 4396mW/4396mW "
        "VDD_CPU_GPU_CV 477mW/477mW VDD_SOC 1392mW/1392mW")
XAVIER = ("RAM 3012/7765MB (lfb 1005x4MB) SWAP 0/3882MB (cached 0MB) CPU [3%@1190,2%@1190] "
          "EMC_FREQ 0% GR3D_FREQ 0% AUX@31C CPU@33.5C thermal@32.3C VDD_IN 5113/5113 "
          "VDD_CPU_GPU_CV 1012/1012 VDD_SOC 1318/1318")
NANO = ("RAM 1500/3956MB (lfb 176x4MB) SWAP 0/1978MB (cached 0MB) CPU [2%@102,1%@102,0%@102,0%@102] "
        "EMC_FREQ 0% GR3D_FREQ 0% PLL@25C CPU@28.5C PMIC@100C GPU@27C AO@35C thermal@27.75C "
        "POM_5V_IN 1138/1138 POM_5V_GPU 0/0 POM_5V_CPU 153/153")
POWERMETRICS = """*** Sampled system activity (Mon Mar  4 10:00:00 2024 +0100) (102.51ms elapsed) ***

**** Processor usage ****

E-Cluster HW active frequency: 1075 MHz
CPU 0 frequency: 1209 MHz

CPU Power: 1425 mW
GPU Power: 38 mW
ANE Power: 0 mW
Combined Power (CPU + GPU + ANE): 1463 mW
"""


def test_tegrastats_formats_parse_to_rails():
    from moerun.plugins.trackers import parse_tegrastats

    orin = parse_tegrastats(ORIN)
    assert orin == {"VDD_IN": 4396.0, "VDD_CPU_GPU_CV": 477.0, "VDD_SOC": 1392.0}
    assert parse_tegrastats(XAVIER)["VDD_IN"] == 5113.0
    nano = parse_tegrastats(NANO)
    assert nano == {"POM_5V_IN": 1138.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 153.0}


def test_powermetrics_sample_parses():
    from moerun.plugins.trackers import parse_powermetrics

    p = parse_powermetrics(POWERMETRICS)
    assert p["Combined Power (CPU + GPU + ANE)"] == 1463.0 and p["CPU Power"] == 1425.0


def test_sampled_power_integrates_the_board_rail():
    from moerun.plugins.trackers import TegrastatsTracker

    t = TegrastatsTracker()
    for i, line in enumerate([ORIN, ORIN.replace("VDD_IN 4396mW", "VDD_IN 5396mW"), NANO]):
        t.feed(line, now=float(i) * 0.1)
    from moerun.plugins.trackers import integrate

    out = integrate(t.readings)
    # 0.1 s at (4.396+5.396)/2 W, then 0.1 s at (5.396+1.138)/2 W (the Nano line's POM_5V_IN)
    assert out["available"] and out["samples"] == 3
    assert out["joules"] == pytest.approx(0.1 * (4.396 + 5.396) / 2 + 0.1 * (5.396 + 1.138) / 2)


def test_absent_power_tools_say_why():
    """Each tool this machine lacks gives `available: false` and names what is missing; the
    expectation is read from the machine, so the test holds on a Jetson, a Mac or a GPU too."""
    import importlib.util
    import shutil
    import sys

    from moerun.plugins.trackers import NvmlTracker, PowermetricsTracker, TegrastatsTracker, TorchCudaMemoryTracker

    torch = sys.modules.get("torch")
    absent = {  # tracker -> the words its reason must hold where the tool is absent here
        TegrastatsTracker: "tegrastats not found on PATH" if shutil.which("tegrastats") is None else None,
        PowermetricsTracker: "macOS only" if sys.platform != "darwin" else None,
        NvmlTracker: "pynvml not installed" if importlib.util.find_spec("pynvml") is None else None,
        TorchCudaMemoryTracker: ("no CUDA device in use by torch" if torch is None or not torch.cuda.is_available()
                                 else None),
    }
    assert any(absent.values()), "every power tool present: nothing absent to check here"
    for cls, why in absent.items():
        t = cls()
        t.start()
        out = t.stop()
        if why is None:
            continue
        assert out["available"] is False and why in out["reason"], (cls.__name__, out)
