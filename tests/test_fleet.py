"""Studies over a fleet on Ray: a real local cluster of labelled nodes (a head and extra
nodes, one CPU each) started here, the real `moerun` CLI as the driver, the real torch engine
measuring on the nodes. The lane scheduling itself is checked first with a scripted executor."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from moerun import ConfigError, Point
from moerun.results import read_results
from moerun.results import base_result
from moerun.study import run_study

from conftest import TEST_PLUGINS, run_cli

SMALL = ["--min-rounds", "1", "--target", "0", "--prompt-tokens", "8", "--new-tokens", "4", "--repetitions", "1",
         "--warmup", "0", "-q"]


class TwoLanes:
    """Lane 'a' blocks in its first point until lane 'b' has started one: the study only
    finishes if the lanes really run at the same time."""

    def __init__(self):
        self.b_started = threading.Event()
        self.active: dict[str, int] = {"a": 0, "b": 0}
        self.max_active: dict[str, int] = {"a": 0, "b": 0}
        self.lock = threading.Lock()

    def lane(self, point):
        return point.hardware

    def run(self, point):
        with self.lock:
            self.active[point.hardware] += 1
            self.max_active[point.hardware] = max(self.max_active[point.hardware], self.active[point.hardware])
        if point.hardware == "b":
            self.b_started.set()
        else:
            assert self.b_started.wait(30), "lane b never ran while lane a was measuring"
        time.sleep(0.05)
        with self.lock:
            self.active[point.hardware] -= 1
        r = base_result(point, {})
        r.update(status="ok", metrics={"decode_tok_s": 1.0, "prefill_tok_s": 1.0}, timings={})
        return r


def test_lanes_run_in_parallel_and_one_point_at_a_time_within_a_lane(plugins, tmp_path):
    points = [Point(model=m, backend="torch", hardware=h, role=role, group="tiny-moe")
              for h in ("a", "b") for m, role in (("tiny-moe", "moe"), ("tiny-moe:dense-active", "dense-active"))]
    ex = TwoLanes()
    out = run_study(points, plugins, output=tmp_path / "r.jsonl", executor=ex)
    assert [r.status for r in out.results] == ["ok"] * 4
    assert ex.max_active == {"a": 1, "b": 1}
    assert len(read_results(tmp_path / "r.jsonl")) == 4


def test_hardware_labels_are_checked_and_kept_out_of_old_keys():
    with pytest.raises(ConfigError, match="hardware label"):
        Point(model="tiny-moe", backend="torch", hardware="has space")
    plain = Point(model="tiny-moe", backend="torch")
    assert plain.key == Point.from_dict({k: v for k, v in plain.to_dict().items() if k != "hardware"}).key
    assert Point(model="tiny-moe", backend="torch", hardware="a").key != plain.key


def test_labels_need_the_ray_executor_and_it_needs_a_cluster():
    r = run_cli("-m", "tiny-moe", "-b", "torch", "--hardware", "alpha", *SMALL)
    assert r.returncode == 2 and "add --executor ray" in r.stderr
    r = run_cli("-m", "tiny-moe", "-b", "torch", "--executor", "ray", "--ray-address", "127.0.0.1:1", *SMALL)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no Ray cluster at 127.0.0.1:1" in r.stderr


# ---------------------------------------------------------------- a real cluster

@pytest.fixture(scope="module")
def cluster():
    """A head labelled 'alpha' and a node labelled 'beta', one CPU each. Their workers see
    the test plugins (the fault backend) through the environment the nodes start with."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MOERUN_PLUGINS", "RAY_ADDRESS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TEST_PLUGINS), saved["PYTHONPATH"]]))
    os.environ["MOERUN_PLUGINS"] = "moerun_fault"
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"moerun-hw:alpha": 1}, "include_dashboard": False,
        "object_store_memory": 80 << 20})
    try:
        c.add_node(num_cpus=1, resources={"moerun-hw:beta": 1}, object_store_memory=80 << 20)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fleet(cluster, *args, env=None):
    return run_cli(*args, "--executor", "ray", "--ray-address", cluster.address,
                   env={"MOERUN_PLUGINS": "moerun_fault",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(TEST_PLUGINS), os.environ.get("PYTHONPATH")])),
                        **(env or {})})


@pytest.mark.slow
def test_a_study_over_two_labels_records_each_point_on_its_node(cluster, tmp_path):
    out = tmp_path / "fleet.jsonl"
    study = tmp_path / "fleet.toml"
    study.write_text('[study]\nname = "fleet"\nmodels = ["tiny-moe"]\nbackends = ["torch"]\nisomem = false\n'
                     'hardware = ["alpha", "beta"]\nprompt_tokens = [8]\nnew_tokens = [4]\nrepetitions = 1\n'
                     'warmup = 0\nmin_rounds = 1\ntarget = 0\n')
    r = _fleet(cluster, "study", str(study), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    records = read_results(out)
    assert len(records) == 6  # tiny-moe and its two twins on each label
    assert {(x["point"]["hardware"], x["model_name"]) for x in records} == {
        (h, m) for h in ("alpha", "beta") for m in ("tiny-moe", "tiny-moe:dense-active", "tiny-moe:dense-total")}
    import ray

    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    for x in records:
        assert x["status"] == "ok", x.get("error")
        assert x["hardware"] == x["node"]["hardware"] == x["point"]["hardware"]
        assert f"moerun-hw:{x['hardware']}" in nodes[x["node"]["node_id"]]  # ran where the label lives
        assert x["env"]["cpu_model"] and x["metrics"]["decode_tok_s"] > 0
    # merged file, one table keyed by hardware
    c = run_cli("compare", str(out), "--json")
    assert c.returncode == 0, c.stderr
    merged = json.loads(c.stdout)
    assert {row["hardware"] for row in merged["results"]} == {"alpha", "beta"}
    assert {v["machine"].split(":")[0] for v in merged["verdicts"]} == {"alpha", "beta"}
    text = run_cli("compare", str(out)).stdout
    assert "alpha: " in text and "beta: " in text
    report = run_cli("report", str(out), "--out", str(tmp_path / "rep"))
    assert report.returncode == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("| alpha |") >= 4 and md.count("| beta |") >= 4  # results and verdict rows per label


@pytest.mark.slow
def test_unknown_label_is_unavailable_with_the_reason(cluster, tmp_path):
    out = tmp_path / "r.jsonl"
    r = _fleet(cluster, "-m", "tiny-dense", "-b", "torch", "--hardware", "jetson-orin-nano-8gb", "-o", str(out), *SMALL)
    (rec,) = read_results(out)
    assert rec["status"] == "unavailable" and rec["retry"] is True
    assert "no live Ray node offers hardware 'jetson-orin-nano-8gb'" in rec["error"]
    assert "alpha (1 node" in rec["error"] and "beta (1 node" in rec["error"]
    assert r.returncode == 0


@pytest.mark.slow
def test_a_node_killed_mid_point_fails_that_point_and_a_rerun_measures_it(cluster, tmp_path):
    """A third node 'gamma' whose worker hangs in load (the fault backend's gate) is killed;
    the study completes with that point failed and the reason. Rerunning the study with the
    node back measures only what is missing."""
    gate = tmp_path / "gate"
    gate.write_text("hold")
    gamma = cluster.add_node(num_cpus=1, resources={"moerun-hw:gamma": 1}, object_store_memory=80 << 20,
                             env_vars={"MOERUN_TEST_HANG": "1"})
    cluster.wait_for_nodes()
    out = tmp_path / "kill.jsonl"
    args = ["-m", "tiny-moe", "--no-twins", "-b", "fault", "--hardware", "alpha,gamma", "-O", f"hang_while={gate}",
            "-O", "hang_model=tiny-moe", "-O", "hang_if_env=MOERUN_TEST_HANG", "-o", str(out), *SMALL]
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("moerun")
    env = {**os.environ, "MOERUN_PLUGINS": "moerun_fault",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TEST_PLUGINS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([str(exe), "--executor", "ray", "--ray-address", cluster.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        pid_file = Path(str(gate) + ".pid")
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pid_file.exists(), "the point on gamma never started"
        cluster.remove_node(gamma, allow_graceful=False)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        gate.unlink(missing_ok=True)  # let an orphaned child of the killed node finish
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr  # a failed point: exit 1, the study completed
    records = {x["point"]["hardware"]: x for x in read_results(out)}
    assert records["alpha"]["status"] == "ok"
    lost = records["gamma"]
    assert lost["status"] == "failed" and lost["retry"] is True
    assert lost["error"].startswith("node lost mid-point")
    assert "failed" in stdout and "node lost mid-point" in stdout
    # the node is back: a rerun measures gamma's point and leaves alpha's alone
    pid_file.unlink(missing_ok=True)
    cluster.add_node(num_cpus=1, resources={"moerun-hw:gamma": 1}, object_store_memory=80 << 20)
    cluster.wait_for_nodes()
    r = _fleet(cluster, *args)
    assert r.returncode == 0, r.stderr
    after = read_results(out)
    assert len(after) == 3  # alpha's one record, gamma's failed one, gamma's new one
    assert [x["status"] for x in after if x["point"]["hardware"] == "alpha"] == ["ok"]
    assert [x["status"] for x in after if x["point"]["hardware"] == "gamma"] == ["failed", "ok"]
