"""The backend toolkit's shared checks: options declared as data and checked before anything
is prepared, and the one input check every session runs on a step."""

from __future__ import annotations

import pytest

from moerun.toolkit import ConfigError, Option, check_step

from conftest import run_cli


def test_check_step_accepts_a_good_step_and_names_what_is_wrong_with_a_bad_one():
    assert check_step([[1, 2, 3]], vocab=10, cached=0, max_context=8) == 3
    assert check_step([[1, 2], [3, 4]], vocab=10, cached=6, max_context=8, max_batch=2) == 2
    cases = [
        ([[]], "at least one token id"),
        ([], "at least one token id"),
        ([[1, 2], [3]], "the same count"),
        ([[1], [2], [3]], "3 sequences: the session was loaded for batch size 2"),
        ([[1, 10]], r"token ids must be in \[0, 10\), got 1..10"),
        ([[-1]], r"got -1..-1"),
        ([[1, 2, 3]], "context full: 6 cached \\+ 3 new tokens > 8"),
    ]
    for rows, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_step(rows, vocab=10, cached=6, max_context=8, max_batch=2)


def test_every_session_runs_the_shared_step_check(plugins, cache):
    """The same bad step gets the same message from every CPU engine."""
    from moerun import LoadSettings, synthetic_checkpoint

    spec = plugins.models.resolve("tiny-dense")
    ckpt = synthetic_checkpoint(spec, cache)
    for name, precision in (("torch", "fp32"), ("llamacpp", "f32"), ("onnxruntime", "fp32")):
        backend = plugins.backends.get(name)()
        with backend.load(backend.prepare(ckpt, precision, cache), LoadSettings(max_context=8)) as session:
            with pytest.raises(ConfigError, match=rf"token ids must be in \[0, {spec.vocab_size}\)"):
                session.prefill([0, spec.vocab_size])
            with pytest.raises(ConfigError, match="context full: 0 cached \\+ 300 new tokens > "):
                session.prefill([i % spec.vocab_size for i in range(300)])  # llama.cpp's context is >= 256
            session.reset()


def test_declared_options_are_checked_by_name_kind_and_choice(plugins):
    llama = plugins.backends.get("llamacpp")
    llama.check_options({"repack": True, "n_batch": 64, "flash_attn": "auto", "type_k": "q8_0"})
    with pytest.raises(ConfigError, match="unknown option\\(s\\) nope; known: advice, flash_attn, mmap"):
        llama.check_options({"nope": 1})
    with pytest.raises(ConfigError, match="option n_batch takes int, got 'many'"):
        llama.check_options({"n_batch": "many"})
    with pytest.raises(ConfigError, match="option repack takes bool, got 1"):
        llama.check_options({"repack": 1})
    with pytest.raises(ConfigError, match="option type_k must be one of 'f32', 'f16', 'q8_0', 'q4_0', 'bf16', got 'q5'"):
        llama.check_options({"type_k": "q5"})
    with pytest.raises(ConfigError, match="option flash_attn must be one of 'auto', true, false, got 1"):
        llama.check_options({"flash_attn": 1})
    with pytest.raises(ConfigError, match="backend tensorrt: unknown option\\(s\\) x; known: none"):
        plugins.backends.get("tensorrt").check_options({"x": 1})
    opt = Option(help="anything", kinds=(int, str))
    opt.check("b", "o", 3)
    with pytest.raises(ConfigError, match="option o takes int or str, got 1.5"):
        opt.check("b", "o", 1.5)


def test_a_bad_option_stops_the_cli_before_anything_is_prepared(tmp_path):
    """torch used to load the whole model before it looked at its options."""
    out = tmp_path / "r.jsonl"
    r = run_cli("-b", "torch", "-m", "tiny-moe", "-O", "compile_mod=default", "-o", str(out), "-q")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "moerun: error: backend torch: unknown option(s) compile_mod; known: breakdown, compile_mode"]
    assert not out.exists()
