"""moerun's backend conformance suite, for in-tree and third-party backends alike.

Subclass it in a pytest test module and name the backend::

    from moerun.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend_name = "mine"          # as registered by your plugin
        precision = "fp32"             # the precision held to the reference (default: the
                                       # backend's default precision)
        parity_atol = 1e-3             # max |logit difference| allowed against PyTorch fp32

Every test skips, with the reason, when the backend is unavailable here (its
``availability()`` says why); the availability report itself is always checked. Parity
runs against the PyTorch fp32 reference on the same synthetic checkpoint and token ids,
and skips when torch is not installed. Tiny dense and MoE presets keep the suite to
seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from .backend import Availability, Backend, LoadSettings
from .cache import Cache
from .checkpoint import synthetic_checkpoint
from .errors import ConfigError, MoerunError, UnsupportedError
from .manager import get_plugin_manager
from .precision import PRECISIONS
from .parity import teacher_forced_logits
from .point import batch_token_ids, token_ids
from .routing import Routing, plan_for


class BackendConformance:
    """Mix into a ``Test*`` class; set ``backend_name``."""

    backend_name: ClassVar[str] = ""
    precision: ClassVar[str | None] = None
    parity_atol: ClassVar[float] = 1e-3
    parity_min_top1: ClassVar[float] = 0.95
    models: ClassVar[tuple[str, ...]] = ("tiny-dense", "tiny-moe")
    load_options: ClassVar[dict[str, Any]] = {}

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def plugins(cls):
        return get_plugin_manager()

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, plugins) -> Backend:
        if not cls.backend_name:
            pytest.fail("set backend_name on the conformance test class")
        return plugins.backends.get(cls.backend_name)()

    @pytest.fixture(scope="class")
    @classmethod
    def available(cls, backend) -> Backend:
        av = backend.availability()
        if not av.available:
            pytest.skip(f"backend {backend.name} unavailable here: {av.reason}")
        return backend

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_cache(cls, tmp_path_factory) -> Cache:
        return Cache(tmp_path_factory.mktemp("moerun-conformance"))

    def _precision(self, backend: Backend) -> str:
        return self.precision or backend.capabilities.default_precision

    def _session(self, plugins, backend, cache, model, max_context=64, batch_size=1):
        spec = plugins.models.resolve(model)
        ck = synthetic_checkpoint(spec, cache, seed=0)
        precision = self._precision(backend)
        backend.check(spec, precision)
        art = backend.prepare(ck, precision, cache)
        return spec, ck, backend.load(art, LoadSettings(max_context=max_context, batch_size=batch_size,
                                                        options=dict(self.load_options)))

    # ------------------------------------------------------------------ always
    def test_availability_is_reported(self, backend):
        av = backend.availability()
        assert isinstance(av, Availability)
        if av.available:
            assert av.version, "an available backend reports its engine version"
        else:
            assert av.reason, "an unavailable backend says why"
            assert av.install_hint or backend.install_hint, "and how to install it"

    def test_capabilities_are_consistent(self, backend):
        caps = backend.capabilities
        assert caps.default_precision in caps.precisions
        unknown = [p for p in caps.precisions if p not in PRECISIONS]
        assert not unknown, f"precisions moerun does not know: {unknown}"
        assert backend.name and all(isinstance(a, str) for a in backend.aliases)

    # ------------------------------------------------------------------ when available
    @pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
    def test_prefill_and_decode_shapes(self, plugins, available, conformance_cache, model):
        spec, _, s = self._session(plugins, available, conformance_cache, model)
        try:
            ids = token_ids(spec.vocab_size, 12, seed=1)
            last = s.prefill(ids[:8])
            assert last.shape == (1, spec.vocab_size) and last.dtype == np.float32
            assert np.isfinite(last).all()
            s.reset()
            every = s.prefill(ids[:8], all_logits=True)
            assert every.shape == (8, spec.vocab_size)
            np.testing.assert_allclose(every[-1], last[0], atol=self.parity_atol)
            one = s.decode(ids[8])
            assert one.shape == (spec.vocab_size,) and one.dtype == np.float32
            s.synchronize()
        finally:
            s.close()

    def test_reset_restarts_the_sequence(self, plugins, available, conformance_cache):
        spec, _, s = self._session(plugins, available, conformance_cache, "tiny-moe")
        try:
            ids = token_ids(spec.vocab_size, 10, seed=2)
            a = teacher_forced_logits(s, ids, 6)
            b = teacher_forced_logits(s, ids, 6)
            np.testing.assert_allclose(a, b, atol=1e-5)
        finally:
            s.close()

    def test_decode_continues_the_prefill(self, plugins, available, conformance_cache):
        spec, _, s = self._session(plugins, available, conformance_cache, "tiny-moe")
        try:
            ids = token_ids(spec.vocab_size, 12, seed=3)
            whole = s.prefill(ids, all_logits=True)
            s.reset()
            s.prefill(ids[:7])
            steps = np.stack([s.decode(t) for t in ids[7:]])
            np.testing.assert_allclose(steps, whole[7:], atol=self.parity_atol)
        finally:
            s.close()

    def test_a_batched_step_matches_each_sequence_alone(self, plugins, available, conformance_cache):
        """With `Capabilities.max_batch` above 1: `prefill_batch` / `decode_batch` of three
        sequences give each sequence's own logits (its own cache row and positions)."""
        limit = available.capabilities.max_batch
        if limit is not None and limit < 3:
            pytest.skip(f"backend {available.name} decodes at most {limit} sequence(s) together")
        spec, _, s = self._session(plugins, available, conformance_cache, "tiny-moe", max_context=16, batch_size=3)
        try:
            seqs = [token_ids(spec.vocab_size, 10, seed=20 + b) for b in range(3)]
            got = [s.prefill_batch([q[:7] for q in seqs])] + [s.decode_batch([q[j] for q in seqs]) for j in (7, 8, 9)]
            for b, q in enumerate(seqs):
                s.reset()
                want = [s.prefill(q[:7])[-1]] + [s.decode(t) for t in q[7:]]
                np.testing.assert_allclose(np.stack([g[b] for g in got]), np.stack(want), atol=self.parity_atol)
        finally:
            s.close()

    @pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
    def test_parity_with_the_pytorch_reference(self, plugins, available, conformance_cache, model):
        try:
            reference = plugins.backends.get("torch")()
        except MoerunError:
            pytest.skip("the torch reference backend is not registered")
        if not reference.availability().available:
            pytest.skip("torch is not installed: no reference to compare with")
        spec, ck, s = self._session(plugins, available, conformance_cache, model)
        ref = reference.load(reference.prepare(ck, "fp32", conformance_cache), LoadSettings(max_context=64))
        try:
            ids = token_ids(spec.vocab_size, 20, seed=4)
            got, want = teacher_forced_logits(s, ids, 14), teacher_forced_logits(ref, ids, 14)
            diff = float(np.abs(got - want).max())
            top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
            print(f"{self.backend_name} {self._precision(available)} {model}: max abs diff {diff:.2e}, "
                  f"top-1 agreement {top1:.0%}")
            assert diff <= self.parity_atol, f"max abs diff {diff:.3g} > {self.parity_atol}"
            assert top1 >= self.parity_min_top1
        finally:
            s.close()
            ref.close()

    def test_observed_routing_is_the_planted_routing(self, plugins, available, conformance_cache):
        """Where the backend exposes its expert choices (`Session.observe_routing`), they are
        exactly the experts a planted routing put into the weights, for every token and layer."""
        spec = plugins.models.resolve("tiny-moe")
        precision = self._precision(available)
        available.check(spec, precision)
        ck = synthetic_checkpoint(spec, conformance_cache, seed=0, routing="zipf:1.0")
        s = available.load(available.prepare(ck, precision, conformance_cache),
                           LoadSettings(max_context=64, options=dict(self.load_options)))
        try:
            ids = batch_token_ids(spec.vocab_size, 20, 0, 1, "zipf:1.0")[0]
            got = s.observe_routing(ids[:12], ids[12:])
        finally:
            s.close()
        if got is None:
            pytest.skip(f"backend {available.name} does not expose its expert choices")
        want = plan_for(spec, Routing.parse("zipf:1.0")).table[ids]
        assert np.asarray(got).shape == want.shape, "one row per token, one column per MoE layer, k experts"
        assert (np.sort(got, axis=-1) == np.sort(want, axis=-1)).all()

    def test_unsupported_precision_is_refused(self, plugins, available):
        spec = plugins.models.resolve("tiny-dense")
        missing = next((p for p in PRECISIONS if p not in available.capabilities.precisions), None)
        if missing is None:
            pytest.skip("the backend supports every precision moerun knows")
        with pytest.raises(UnsupportedError):
            available.check(spec, missing)
        with pytest.raises(ConfigError):
            available.check(spec, "not-a-precision")

    def test_bad_token_ids_are_rejected(self, plugins, available, conformance_cache):
        spec, _, s = self._session(plugins, available, conformance_cache, "tiny-dense")
        try:
            with pytest.raises(MoerunError):
                s.prefill([0, spec.vocab_size])
            with pytest.raises(MoerunError):
                s.prefill([])
        finally:
            s.close()

    def test_close_is_idempotent(self, plugins, available, conformance_cache):
        """Closing twice (an explicit close, then the context manager's) must not raise:
        the runner closes sessions in `finally` blocks after a failure may have closed them."""
        _, _, s = self._session(plugins, available, conformance_cache, "tiny-dense")
        for attempt in ("first close", "second close", "the context manager's exit"):
            try:
                if attempt == "the context manager's exit":
                    with s:
                        pass
                else:
                    s.close()
            except Exception as exc:  # noqa: BLE001 - any error is the failure under test
                pytest.fail(f"{type(s).__name__}: {attempt} raised {type(exc).__name__}: {exc}")
        s.close()
