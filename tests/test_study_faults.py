"""A study survives its points' faults and its own death: crash, hang, out-of-memory (by
limit and by SIGKILL), and the study process killed mid-run, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TEST_PLUGINS

SMALL = ["--prompt-tokens", "4", "--new-tokens", "2", "--repetitions", "1", "--warmup", "0", "-q",
         "--min-rounds", "1", "--target", "0"]  # one round: these tests are about faults


def _moerun(*args, **kw):
    exe = Path(sys.executable).with_name("moerun")
    env = {**os.environ, "MOERUN_PLUGINS": "moerun_fault", "PYTHONPATH": str(TEST_PLUGINS)}
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_out_of_memory_by_limit_and_by_kill_are_failures_with_reasons(tmp_path):
    out = tmp_path / "oom.jsonl"
    p = _moerun("-b", "fault", "-m", "tiny-dense", "-O", "mode=oom", "--memory-limit", "3000", "-o", str(out),
                *SMALL)
    p.communicate(timeout=300)
    (r,) = _lines(out)
    assert r["status"] == "failed" and r["error"] == "out of memory (memory limit 3000 MB)"
    out2 = tmp_path / "kill.jsonl"
    p = _moerun("-b", "fault", "-m", "tiny-dense", "-O", "mode=sigkill", "-o", str(out2), *SMALL)
    p.communicate(timeout=300)
    (r,) = _lines(out2)
    assert r["status"] == "failed" and "killed (the out-of-memory killer" in r["error"] and "SIGKILL" in r["error"]


def test_study_killed_mid_run_resumes_without_redoing_finished_points(tmp_path):
    out = tmp_path / "study.jsonl"
    gate = tmp_path / "hang"
    gate.touch()
    # three points; the third hangs while the gate file exists; the study is SIGKILLed then
    args = ["-b", "fault", "-m", "tiny-dense", "-m", "tiny-moe", "-m", "tiny-olmoe", "--no-twins",
            "--timeout", "120", "-o", str(out), "-O", f"hang_while={gate}", "-O", "hang_model=tiny-olmoe", *SMALL]
    study = _moerun(*args, start_new_session=True)
    deadline = time.time() + 180
    pid_file = Path(f"{gate}.pid")
    while time.time() < deadline and not pid_file.exists():  # the tiny-olmoe point is hanging now
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    time.sleep(0.5)
    before = _lines(out) if out.exists() else []  # the points the shuffled round ran before it
    assert all(r["model_name"] != "tiny-olmoe" for r in before)
    os.kill(study.pid, signal.SIGKILL)  # the study process dies mid-point
    study.communicate(timeout=30)
    for _ in range(50):  # the measurement must not outlive the study that started it
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state == "Z":  # dead, waiting for a reaper
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"measurement process {worker} outlived its killed study")
    first = _lines(out) if out.exists() else []
    assert first == before and all(r["status"] == "ok" for r in first)
    gate.unlink()
    resumed = _moerun(*args, "--json")
    stdout, _ = resumed.communicate(timeout=300)
    doc = json.loads(stdout)
    done_before = {r["model_name"] for r in first}
    assert [bool(r.get("resumed")) for r in doc["results"]] == [r["model_name"] in done_before
                                                                for r in doc["results"]]
    assert not doc["results"][2].get("resumed")  # tiny-olmoe, killed mid-point, ran again
    after = _lines(out)  # parses line by line; each point exactly once
    assert [r["status"] for r in after] == ["ok", "ok", "ok"]
    assert len({r["key"] for r in after}) == 3
    assert after[:len(first)] == first
