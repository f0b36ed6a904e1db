"""The quantizer contract (adj_quant/quantizers/base.py): the registry by name and the
protocol that the built-in quantizers fulfil."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from adj_quant import quantizers
from adj_quant.errors import UserError
from adj_quant.quantizers import base
from adj_quant.quantizers.adjustable import AdjustableQuantizer
from adj_quant.quantizers.lsq import LsqQuantizer


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test to change."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return base._REGISTRY


def test_the_built_in_quantizers_are_named_without_importing_tensorflow():
    code = ("import sys\nfrom adj_quant import quantizers\nprint(quantizers.names())\n"
            "print('tensorflow' in sys.modules, 'adj_quant.quantizers.adjustable' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["('adjq', 'lsq')", "False False"]


def test_get_returns_the_registered_class_and_refuses_unknown_names_in_one_line():
    assert quantizers.get("adjq") is AdjustableQuantizer
    assert quantizers.get("lsq") is LsqQuantizer
    with pytest.raises(UserError, match=r"^quantizer 'lsq\+': use one of adjq, lsq$"):
        quantizers.get("lsq+")
    from adj_quant.qnetwork import QUANTIZERS, QuantConfig

    assert QUANTIZERS == quantizers.names()
    with pytest.raises(UserError, match="use one of adjq, lsq"):
        QuantConfig(quantizer="int8")


class _Fixed(tf.Module):
    """A minimal quantizer at fixed bits: rounds to a grid of ``2^bits`` levels on the
    calibrated range (enough to exercise the registry)."""

    def __init__(self, scope, channels, *, init_bits=8):
        super().__init__(name=None)
        self.scope, self.channels, self.init_bits = scope, channels, init_bits
        self.init_min = tf.Variable(-np.ones([channels], np.float32), trainable=False)
        self.init_max = tf.Variable(np.ones([channels], np.float32), trainable=False)

    @classmethod
    def for_tensor(cls, scope, channels, *, init_bits, **unused):
        return cls(scope, channels, init_bits=init_bits)

    def __call__(self, x):
        low, width = self.adjusted_range()
        step = width / (2.0 ** self.init_bits - 1)
        return tf.round((x - low) / step) * step + low

    def bits(self):
        return tf.fill([self.channels], float(self.init_bits))

    def bits_variables(self):
        return []

    def adjusted_range(self, x=None):
        return self.init_min, self.init_max - self.init_min

    def set_range(self, minimum, maximum):
        self.init_min.assign(minimum)
        self.init_max.assign(maximum)

    def init_from_weights(self, weights):
        pass


def test_a_registered_quantizer_is_listed_and_built_by_name(registry):
    base.register("fixed")(_Fixed)
    assert quantizers.names() == ("adjq", "lsq", "fixed")
    quant = quantizers.get("fixed").for_tensor("s/q", 2, axis=-1, init_bits=2,
                                                bits_trainable=False, signed=False,
                                                live_range=False, compiled=True,
                                                range_preset_id=5, bits_grad="original")
    assert isinstance(quant, quantizers.Quantizer)
    quant.set_range([0.0, 0.0], [3.0, 3.0])
    np.testing.assert_array_equal(quant(tf.constant([[0.4, 2.6]])).numpy(), [[0.0, 3.0]])
    base.register("fixed")(_Fixed)  # the same class again (a reloaded module) is fine


def test_register_refuses_a_taken_name_a_bad_name_and_a_class_missing_members(registry):
    class Other(_Fixed):
        pass

    with pytest.raises(UserError, match=r"^quantizer name 'adjq' is taken by "
                                        r"adj_quant\.quantizers\.adjustable\.AdjustableQuantizer"):
        base.register("adjq")(Other)
    with pytest.raises(UserError, match="not an identifier"):
        base.register("my quantizer")

    class Partial:
        def __call__(self, x):
            return x

        def bits(self):
            return None

    with pytest.raises(UserError, match=r"^quantizer 'partial' \(.*Partial\) lacks for_tensor, "
                                        r"bits_variables, adjusted_range, set_range, "
                                        r"init_from_weights; define every member"):
        base.register("partial")(Partial)
    with pytest.raises(UserError, match=r"lacks __call__; define"):
        base.register("uncallable")(type("Uncallable", (_Fixed,), {"__call__": None}))
    with pytest.raises(UserError, match=r"lacks for_tensor, __call__, bits, "):
        base.register("bare")(type("Bare", (), {}))
    assert quantizers.names() == ("adjq", "lsq")


NETWORK_OPTIONS = dict(axis=-1, init_bits=4, signed=True, live_range=False, compiled=False,
                       range_preset_id=3, bits_grad="scale_only")


def test_the_built_in_quantizers_fulfil_the_protocol():
    adjq = AdjustableQuantizer.for_tensor("s/a", 3, bits_trainable=True, **NETWORK_OPTIONS)
    fixed = AdjustableQuantizer.for_tensor("s/f", 3, bits_trainable=False, **NETWORK_OPTIONS)
    lsq = LsqQuantizer.for_tensor("s/l", 3, bits_trainable=False, **NETWORK_OPTIONS)
    for quant in (adjq, fixed, lsq):
        assert isinstance(quant, quantizers.Quantizer)
        assert quant.channels == 3 and quant.scope.startswith("s/")
        np.testing.assert_array_equal(quant.bits().numpy(), [4.0, 4.0, 4.0])
    # The bits train through bits_scale only where they are trainable.
    assert adjq.bits_variables() == [adjq.bits_scale]
    assert fixed.bits_variables() == [] and lsq.bits_variables() == []
    # The options reached the constructors: the preset, the estimator, signed, compiled.
    assert (adjq.alpha_lo, adjq.alpha_hi) == (0.2, 1.7) and adjq.bits_grad == "scale_only"
    assert not adjq.compiled and lsq.signed and lsq.offset is None
    # The adjustable quantizer needs nothing from the weights but their min/max.
    before = [v.numpy().copy() for v in adjq.variables]
    adjq.init_from_weights(np.full([3, 3, 2, 3], 5.0, np.float32))
    for old, v in zip(before, adjq.variables):
        np.testing.assert_array_equal(v.numpy(), old)
    with pytest.raises(UserError, match="fixed bits"):
        LsqQuantizer.for_tensor("s/l2", 3, bits_trainable=True, **NETWORK_OPTIONS)
