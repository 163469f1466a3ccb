"""Memory caps: a point's worker inside a memory cgroup of the cap (moerun.memcap), weights
paged from storage, what paging cost per token against the prediction, the iso-cap dense
twin, and the refusal where no cgroup can be made.

The cgroup tests run where a memory cgroup can be made (cgroup v1 as root here and in CI);
elsewhere they skip with the reason `moerun.memcap.cap_support` gives.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from moerun import memory
from moerun.errors import ConfigError
from moerun.isolation import run_isolated
from moerun.memcap import cap_label, cap_support, parse_cap
from moerun.point import Point
from moerun.predict import HARDWARE, cap_crossover, paged_reads, predict

CAN_CAP = cap_support()
needs_cgroup = pytest.mark.skipif(not CAN_CAP["available"], reason=CAN_CAP.get("reason", ""))


def test_a_cap_is_a_size_or_a_device_profile():
    assert parse_cap("3GB") == 3_000_000_000
    assert parse_cap("2.5GiB") == int(2.5 * 2**30)
    assert parse_cap("3000MB") == parse_cap("3gb") == parse_cap(3_000_000_000)
    jetson = HARDWARE["jetson-orin-nano-8gb"]
    assert parse_cap("jetson-orin-nano-8gb") == int(jetson.memory_bytes - jetson.os_reserve_bytes)
    for bad in ("3 parsecs", "lots", "1MB", True):
        with pytest.raises(ConfigError):
            parse_cap(bad)
    assert cap_label(3_000_000_000) == "3.0 GB" and cap_label(150_000_000) == "0.15 GB" and cap_label(None) == "none"
    assert Point(model="tiny-moe", backend="torch", memory_cap="3GB").memory_cap == 3_000_000_000
    # uncapped points keep the keys they had before caps existed; a cap is another point
    plain = Point(model="tiny-moe", backend="torch")
    assert "memory_cap" not in json.dumps(plain.key) and plain.key != Point(model="tiny-moe", backend="torch",
                                                                             memory_cap="3GB").key


def test_without_a_cgroup_a_capped_point_is_unsupported_and_says_how(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("MOERUN_CGROUP_FS", str(tmp_path))  # a machine with no cgroup mounted
    result = run_isolated(Point(model="tiny-moe", backend="llamacpp", memory_cap="1GB", new_tokens=2,
                                repetitions=1, warmup=0), cache=cache)
    assert result["status"] == "unsupported"
    assert result["error"].startswith("no memory cap: no memory cgroup found under") and "systemd-run" in result["error"]
    # and from the command line: one line, the study goes on, exit 0 (unsupported is not a failure)
    out = run_cli("-m", "tiny-moe", "--no-twins", "-b", "llamacpp", "--memory-cap", "none,1GB", "--new-tokens", "2",
                  "--repetitions", "1", "--min-rounds", "1", "--max-rounds", "1", "-o", str(tmp_path / "r.jsonl"),
                  env={"MOERUN_CGROUP_FS": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    statuses = sorted(json.loads(line)["status"] for line in (tmp_path / "r.jsonl").read_text().splitlines())
    assert statuses == ["ok", "unsupported"]
    assert "unsupported: tiny-moe on llamacpp: no memory cap" in out.stdout.replace("\n", " ")


def test_no_isolate_refuses_a_cap(tmp_path):
    out = run_cli("-m", "tiny-moe", "--no-twins", "-b", "llamacpp", "--memory-cap", "1GB", "--no-isolate",
                  "--new-tokens", "2", "--repetitions", "1", "--min-rounds", "1", "-o", str(tmp_path / "r.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert record["status"] == "unsupported" and "drop --no-isolate" in record["error"]


@needs_cgroup
def test_a_model_larger_than_its_cap_runs_pages_and_stays_under_it(cache):
    """small-moe at f16 is a 177 MB file; under a 150 MB cap its worker runs, the cgroup's
    peak stays under the cap, the file is never wholly resident, and with page-sized faults
    (advice=random) the storage bytes per token are the ones the paging model predicts."""
    point = Point(model="small-moe", backend="llamacpp", memory_cap="150MB", prompt_tokens=32, new_tokens=16,
                  repetitions=2, warmup=1, options={"advice": "random"})
    r = run_isolated(point, cache=cache)
    assert r["status"] == "ok", r.get("error")
    cap, paging = r["cap"], r["paging"]
    assert cap["outcome"] == "ran" and cap["cgroup"] == "v1" or cap["cgroup"] in ("v2", "systemd")
    assert r["artifact"]["size_bytes"] > 150_000_000 >= cap["peak_bytes"] > 100_000_000
    assert paging["resident_after_timed"]["resident_bytes"] < paging["artifact_bytes"]
    assert paging["cold"]["load"]["read_bytes"] > 0  # the file was evicted: the load read it from storage
    measured = paging["decode"]["read_bytes_per_token"]
    predicted = paging["predicted"]["read_bytes_per_token"]
    assert paging["predicted"]["regime"] == "experts paged" and predicted > 0
    assert 0.5 < measured / predicted < 2.0, (measured, predicted)
    assert paging["read_amplification"] == pytest.approx(measured / predicted)
    assert r["session"]["advice"] == "random" and r["session"]["advised_bytes"] >= paging["artifact_bytes"] * 0.9


@needs_cgroup
def test_a_point_that_cannot_fit_is_recorded_as_not_fitting_and_the_study_goes_on(tmp_path):
    """Read into memory (mmap off), small-moe's 177 MB of weights cannot page: under 120 MB
    the out-of-memory killer ends it in its load. That is a result, not a failure."""
    out = run_cli("-m", "small-moe", "--no-twins", "-b", "llamacpp", "-O", "mmap=false", "--memory-cap", "120MB,1GB",
                  "--new-tokens", "4", "--repetitions", "1", "--min-rounds", "1", "--max-rounds", "1",
                  "--no-lockstep", "-o", str(tmp_path / "r.jsonl"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    records = {json.loads(x)["point"]["memory_cap"]: json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()}
    killed, ran = records[120_000_000], records[1_000_000_000]
    assert killed["status"] == "unsupported" and killed["cap"]["outcome"] == "killed" and killed["cap"]["oom_kills"] >= 1
    assert killed["error"] == "does not fit under 0.12 GB: killed by the out-of-memory killer in load"
    assert killed["precision"] == "f16"  # from its preparation, outside the cap
    assert ran["status"] == "ok" and ran["paging"]["decode"]["read_bytes_per_token"] == 0
    assert ran["paging"]["held_anon_bytes"] > 150e6  # read into memory: held, not pageable
    assert "Memory caps: paging" in out.stdout and "killed" in out.stdout


def test_evict_resident_and_advise_see_the_page_cache(tmp_path):
    import mmap

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(8 << 20))
    f.read_bytes()
    before = memory.resident(f)
    assert before["bytes"] == 8 << 20 and before["resident_bytes"] > (6 << 20)
    assert memory.evict(f) == 8 << 20
    assert memory.resident(f)["resident_bytes"] < (2 << 20)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert memory.advise(f, "random") >= 8 << 20
        before = memory.paging_counters()
        bytes(m[: 1 << 20])
        assert memory.paging_counters()["major_faults"] > before["major_faults"]
    assert memory.advise(f, "normal") == 0  # no longer mapped


def test_the_storage_probe_reads_past_the_page_cache(tmp_path, monkeypatch):
    from moerun import storage

    monkeypatch.setattr(storage, "PROBE_FILE_BYTES", 16 << 20)
    monkeypatch.delenv("MOERUN_STORAGE_GBPS")
    probe = storage.storage_probe(tmp_path, refresh=True)
    assert set(probe["read_bytes_s"]) >= {"sequential_1m", "random_128k", "random_4k"}
    assert all(rate > 0 for rate in probe["read_bytes_s"].values())
    assert probe["method"] in ("O_DIRECT", "buffered after posix_fadvise(DONTNEED)")
    assert probe["paging_read_bytes_s"] > 0 and not probe["cached"]
    assert storage.storage_probe(tmp_path)["cached"]


def test_the_paging_model(plugins):
    moe = plugins.models.resolve("olmoe-1b-7b")
    dense = plugins.models.resolve("olmoe-1b-7b:dense-total")
    step = moe.weight_bytes_per_step("q4_k_m")
    weights = moe.total_params * 4.89 / 8
    assert paged_reads(moe, "q4_k_m", room_bytes=weights * 1.1)["read_bytes_per_token"] == 0
    assert paged_reads(dense, "q4_k_m", room_bytes=weights * 1.1)["regime"] == "resident"
    over = paged_reads(dense, "q4_k_m", room_bytes=weights * 0.5)  # a cyclic scan larger than the cache
    assert over["regime"] == "thrashing" and over["read_bytes_per_token"] == pytest.approx(over["step_bytes"])
    half = paged_reads(moe, "q4_k_m", room_bytes=weights * 0.55)
    assert half["regime"] == "experts paged" and 0.4 < half["miss_rate"] < 0.6
    routed = step - moe.weight_bytes_per_token("q4_k_m") + moe.num_layers * moe.top_k * moe.expert_params * 4.89 / 8
    assert half["read_bytes_per_token"] == pytest.approx(half["miss_rate"] * (routed - (step - routed) * 0), rel=0.5)
    # skewed routing keeps its popular experts resident: fewer misses than uniform in the same room
    zipf = paged_reads(moe, "q4_k_m", room_bytes=weights * 0.55, routing="zipf:1.2")
    assert zipf["miss_rate"] < half["miss_rate"]
    # a real file scales every figure
    assert paged_reads(moe, "q4_k_m", room_bytes=weights * 0.55, file_bytes=weights * 2)["read_bytes_per_token"] > 0
    with pytest.raises(ConfigError):
        moe.fit_twin(100_000_000, "q4_k_m")  # the attention alone outgrows a 0.1 GB cap


def test_predict_under_a_cap(plugins):
    moe = plugins.models.resolve("olmoe-1b-7b")
    jetson = HARDWARE["jetson-orin-nano-8gb"]
    free = predict(moe, jetson, precision="q4_k_m")
    capped = predict(moe, jetson, precision="q4_k_m", memory_cap=2e9)
    assert capped["paging"]["storage_bytes_s"] == jetson.storage_bytes_s and capped["paging"]["read_bytes_per_token"] > 0
    assert capped["decode_tok_s"] < free["decode_tok_s"] / 10  # an SD card behind every miss
    twin = moe.fit_twin(2_000_000_000, "q4_k_m")
    assert twin.total_params * 4.89 / 8 == pytest.approx(2e9 * 0.8, rel=0.01)
    fits = predict(twin, jetson, precision="q4_k_m", memory_cap=2e9)
    assert fits["paging"]["regime"] == "resident" and fits["decode_tok_s"] > capped["decode_tok_s"]
    assert predict(moe, HARDWARE["h200"], precision="q4_k_m", memory_cap=2e9)["decode_tok_s"] is None
    assert cap_crossover([{"memory_cap": 4e9, "ratio": 1.5}, {"memory_cap": 2e9, "ratio": 0.5}])["moe_wins"] == "above"
    assert cap_crossover([{"memory_cap": 4e9, "ratio": 1.5}, {"memory_cap": 2e9, "ratio": 1.2}]) is None
    out = run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "apple-m2-pro-16gb", "--memory-cap", "3GB", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [m["model"] for m in data["models"]][-1] == "olmoe-1b-7b:dense-fit-3000MB-q4_k_m"
    assert any(r.get("ratio") for r in data["sweep"])
    bad = run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "apple-m2-pro-16gb", "--memory-cap", "lots")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "memory cap 'lots'" in bad.stderr


def test_a_capped_moe_point_brings_its_iso_cap_twin_and_caps_split_comparisons(plugins, tmp_path):
    from moerun.comparison import comparisons
    from moerun.grid import build_grid
    from moerun.studyfile import StudySpec, load_study

    study = StudySpec(models=["small-moe"], backends=["llamacpp"], isomem=False, memory_caps=[None, "200MB"])
    points = build_grid(plugins, study).points
    fit = [p for p in points if p.role == "dense-fit"]
    assert [(p.model, p.memory_cap) for p in fit] == [("small-moe:dense-fit-200MB-f16", 200_000_000)]
    spec = plugins.models.resolve(fit[0].model)
    assert spec.total_params * 2 == pytest.approx(0.8 * 200e6, rel=0.01) and not spec.is_moe
    groups = comparisons(points, lambda b: "f16")
    assert len(groups) == 2 and {len(g.sides) for g in groups} == {3, 4}
    assert {pair.kind for g in groups for pair in g.pairs} == {"active", "total", "fit"}
    f = tmp_path / "s.toml"
    f.write_text('[study]\nmodels = ["small-moe"]\nmemory_caps = "150MB"\nbackends = ["llamacpp"]\n')
    assert load_study(f).memory_caps == ["150MB"]
    f.write_text('[study]\nmodels = ["small-moe"]\nmemory_caps = ["lots"]\nbackends = ["llamacpp"]\n')
    with pytest.raises(ConfigError, match="memory cap 'lots'"):
        build_grid(plugins, load_study(f))
