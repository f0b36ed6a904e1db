"""Gradual pruning schedule and magnitude masks against hand-computed numbers and NumPy."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from adj_quant.errors import UserError
from adj_quant.sparsity import (
    check_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    polynomial_sparsity,
    zero_fraction,
)


def test_schedule_by_hand():
    # s_i 0, s_f 0.8, t_0 10, n 4 pruning steps every 5 training steps: ends at step 30.
    by_hand = {0: 0.0, 9: 0.0, 10: 0.0, 14: 0.0,
               15: 0.8 - 0.8 * 0.75 ** 3,  # 0.4625
               19: 0.8 - 0.8 * 0.75 ** 3,  # held until the next pruning step
               20: 0.8 - 0.8 * 0.5 ** 3,  # 0.7
               25: 0.8 - 0.8 * 0.25 ** 3,  # 0.7875
               30: 0.8, 1000: 0.8}
    for step, want in by_hand.items():
        got = float(polynomial_sparsity(step, initial=0.0, final=0.8, begin=10, steps=4,
                                        frequency=5))
        assert got == pytest.approx(want, abs=1e-12), step
    assert float(polynomial_sparsity(15, initial=0.5, final=0.5, begin=10, steps=4,
                                     frequency=5)) == pytest.approx(0.5)
    # From a nonzero start: s_f + (s_i - s_f) (1 - 1/2)^3 halfway.
    assert float(polynomial_sparsity(2, initial=0.2, final=0.6, begin=0, steps=4)) == \
        pytest.approx(0.6 - 0.4 * 0.125)


def test_schedule_traces_in_a_function():
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def now():
        return polynomial_sparsity(step, initial=0.0, final=0.5, begin=0, steps=2, frequency=1)

    values = []
    for i in range(4):
        step.assign(i)
        values.append(float(now()))
    assert values == pytest.approx([0.0, 0.5 - 0.5 * 0.125, 0.5, 0.5])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_sparsity_outside_the_unit_interval_is_one_line(bad):
    with pytest.raises(UserError) as err:
        check_sparsity(bad, "--sparsity")
    assert "--sparsity" in str(err.value) and "\n" not in str(err.value)


def test_schedule_refuses_an_empty_schedule():
    with pytest.raises(UserError, match="at least one step"):
        polynomial_sparsity(0, initial=0.0, final=0.5, begin=0, steps=0)


def test_mask_by_hand():
    w = np.array([[0.5, -0.1], [0.0, -2.0], [0.1, 0.3]], np.float32)
    mask = magnitude_mask(w, 0.5).numpy()  # 3 of 6 go: 0.0, then the tie -0.1 / 0.1
    assert mask.tolist() == [[1, 0], [0, 1], [0, 1]]  # the earlier -0.1 goes, 0.1 too
    assert magnitude_mask(w, 0.0).numpy().tolist() == [[1, 1]] * 3
    assert zero_fraction(mask) == 0.5


def _numpy_mask(w, sparsity):
    flat = np.abs(w).reshape(-1)
    pruned = int(np.round(sparsity * flat.size))
    keep = np.ones(flat.size, w.dtype)
    keep[np.argsort(flat, kind="stable")[:pruned]] = 0
    return keep.reshape(w.shape)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.floats(0.0, 0.99), st.integers(0, 2 ** 31 - 1))
def test_mask_equals_numpy_and_keeps_the_largest(size, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=size).astype(np.float32)
    w[rng.integers(0, size, size // 3)] = 0.5  # ties
    mask = magnitude_mask(w, sparsity).numpy()
    np.testing.assert_array_equal(mask, _numpy_mask(w, sparsity))
    assert int((mask == 0).sum()) == int(np.round(sparsity * size))
    if 0 < mask.sum() < size:
        assert np.abs(w[mask == 1]).min() >= np.abs(w[mask == 0]).max()


def test_global_masks_share_one_threshold():
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
               "b": 0.1 * rng.normal(size=(16, 10)).astype(np.float32)}
    masks = global_magnitude_masks(weights, 0.6)
    joined = np.concatenate([weights["a"].reshape(-1), weights["b"].reshape(-1)])
    want = _numpy_mask(joined, 0.6)
    got = np.concatenate([masks["a"].numpy().reshape(-1), masks["b"].numpy().reshape(-1)])
    np.testing.assert_array_equal(got, want)
    assert masks["a"].shape == weights["a"].shape and masks["b"].shape == weights["b"].shape
    # The small-valued tensor is pruned much more than the other.
    assert zero_fraction(masks["b"]) > 0.9 > zero_fraction(masks["a"])
