"""Each training rule of docs/method.md (loss, optimisation) on its own, against
hand-computed values."""

import math

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import training_rules as rules


def test_mini_epoch_schedule_table():
    flags = rules.ScheduleFlags(bits_trainable=True, warm_up_epoch=0.3, iter_train=True,
                                iter_train_freq=2)
    table = rules.schedule_table(1.5, flags)
    # epoch 0: k=0..2 warm-up (no bits); k=3 odd (no); 4 yes; 5 no; 6 yes; 7 no; 8 yes; 9 no
    # epoch 1: k=0 yes, 1 no, 2 yes, 3 no, 4 yes
    expected = [(0, 0, False), (0, 1, False), (0, 2, False), (0, 3, False), (0, 4, True),
                (0, 5, False), (0, 6, True), (0, 7, False), (0, 8, True), (0, 9, False),
                (1, 0, True), (1, 1, False), (1, 2, True), (1, 3, False), (1, 4, True)]
    assert table == expected


@pytest.mark.parametrize("flags, expected", [
    (rules.ScheduleFlags(bits_trainable=False), [False] * 10),                      # rule 1
    (rules.ScheduleFlags(bits_trainable=True, finetune=True, iter_train=True), [False] * 10),
    (rules.ScheduleFlags(bits_trainable=True), [True] * 10),                        # rule 5
    (rules.ScheduleFlags(bits_trainable=True, iter_train=True, iter_train_freq=3),
     [True, False, False, True, False, False, True, False, False, True]),
])
def test_schedule_rules_in_order(flags, expected):
    assert [t for _, _, t in rules.schedule_table(1.0, flags)] == expected


def test_fractional_max_epoch_counts_mini_epochs():
    assert rules.total_mini_epochs(0.3) == 3
    assert rules.total_mini_epochs(2) == 20
    assert rules.mini_epoch_bounds(44) == [0, 4, 9, 13, 18, 22, 26, 31, 35, 40, 44]


def test_learning_rate_curve_by_hand():
    sched = dict(lr_fixed=False, lr_decay=1e-4, reinit=800)
    # step 0: lr * 1 * |cos 0| + 1e-7
    assert rules.learning_rate(0, 3e-6, **sched) == pytest.approx(3e-6 + 1e-7, rel=1e-12)
    # step 400: decay_step 400 -> cos(pi*400/3200) = cos(pi/8) = 0.9238795...
    assert rules.learning_rate(400, 3e-6, **sched) == pytest.approx(
        3e-6 * math.exp(-0.04) * 0.9238795325112867 + 1e-7, rel=1e-12)
    # step 800: the cosine restarts (decay_step 0), the exponential does not
    assert rules.learning_rate(800, 3e-6, **sched) == pytest.approx(
        3e-6 * math.exp(-0.08) + 1e-7, rel=1e-12)
    # just before the restart: cos(pi*799/3200)
    assert rules.learning_rate(799, 3e-6, **sched) == pytest.approx(
        3e-6 * math.exp(-0.0799) * math.cos(math.pi * 799 / 3200) + 1e-7, rel=1e-12)
    assert rules.learning_rate(12345, 3e-6, lr_fixed=True, lr_decay=1e-4, reinit=800) == 3e-6
    assert [s for s in range(2500) if rules.reinit_due(s, 800, False)] == [800, 1600, 2400]
    assert not any(rules.reinit_due(s, 800, True) for s in range(2500))


def test_loss_sign_and_parts():
    q = tf.constant([[1.0, 2.0], [0.0, -1.0]])
    f = tf.constant([[1.5, 2.0], [0.0, 1.0]])
    labels = tf.constant([1, 0])
    # kd by hand: 0.01 * mean(sqrt(.25+1e-5)+sqrt(1e-5), sqrt(1e-5)+sqrt(4+1e-5))
    kd = 0.01 * ((math.sqrt(0.25 + 1e-5) + math.sqrt(1e-5))
                 + (math.sqrt(1e-5) + math.sqrt(4 + 1e-5))) / 2
    ce = (-math.log(math.exp(2) / (math.exp(1) + math.exp(2)))
          - math.log(1 / (1 + math.exp(-1)))) / 2
    weights = dict(ce_weight=7.0, metric_weight=85.0, target=0.18)
    above = rules.adjustable_loss(q, labels, f, tf.constant(0.3), **weights)
    below = rules.adjustable_loss(q, labels, f, tf.constant(0.1), **weights)
    assert float(above["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(above["cross_entropy"]) == pytest.approx(ce, rel=1e-5)
    assert float(above["loss"]) == pytest.approx(kd + 7 * ce + 85 * 0.3, rel=1e-5)
    assert float(below["loss"]) == pytest.approx(kd + 7 * ce - 85 * 0.1, rel=1e-5)
    # The sign makes the metric's gradient push down above the target and up below it.
    for value, direction in ((0.3, 1.0), (0.1, -1.0)):
        m = tf.Variable(value)
        with tf.GradientTape() as tape:
            loss = rules.adjustable_loss(q, labels, f, m * 1.0, ce_weight=7.0, metric_weight=85.0,
                                         target=0.18)["loss"]
        assert float(tape.gradient(loss, m)) == pytest.approx(direction * 85.0)


def test_kd_gives_no_gradient_to_the_teacher():
    f = tf.Variable([[1.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = rules.distillation_loss(tf.constant([[0.0, 0.0]]), f)
    assert tape.gradient(loss, f) is None


def test_swa_snapshot_rule_and_average():
    due = [(e, k) for e in range(3) for k in range(10) if rules.swa_snapshot_due(e, k, 1.2, 0.2)]
    assert due == [(1, 2), (1, 4), (1, 6), (1, 8), (2, 2), (2, 4), (2, 6), (2, 8)]
    assert not any(rules.swa_snapshot_due(e, k, None, 0.2) for e in range(3) for k in range(10))
    v = tf.Variable([0.0, 0.0])
    w = tf.Variable(1.0)
    swa = rules.WeightAverager([v, w])
    snapshots = [([1.0, 2.0], 3.0), ([3.0, -2.0], 5.0), ([2.0, 6.0], -2.0)]
    for vv, ww in snapshots:
        v.assign(vv)
        w.assign(ww)
        swa.snapshot([v, w])
    v.assign([100.0, 100.0])
    assert swa.assign_average([v, w])
    np.testing.assert_allclose(v.numpy(), [2.0, 2.0], rtol=1e-6)
    assert float(w) == pytest.approx(2.0)
    assert not rules.WeightAverager([tf.Variable(1.0)]).assign_average([tf.Variable(2.0)])


def test_adam_matches_keras_and_resets():
    import keras

    rng = np.random.default_rng(0)
    init = rng.normal(size=(3, 2)).astype(np.float32)
    ours_var, keras_var = tf.Variable(init), tf.Variable(init)
    ours = rules.Adam([ours_var], "adam")
    theirs = keras.optimizers.Adam(learning_rate=0.01, epsilon=1e-8)
    for i in range(5):
        g = tf.constant(rng.normal(size=(3, 2)).astype(np.float32))
        ours.apply([g], [ours_var], 0.01)
        theirs.apply_gradients([(g, keras_var)])
    np.testing.assert_allclose(ours_var.numpy(), keras_var.numpy(), rtol=1e-5, atol=1e-6)
    ours.reset()
    assert int(ours.iterations) == 0 and not np.any(ours.m[0].numpy())
    # After a reset the first step is again a bias-corrected step of size lr*sign(g).
    before = ours_var.numpy().copy()
    ours.apply([tf.constant(np.full((3, 2), 0.5, np.float32))], [ours_var], 0.01)
    np.testing.assert_allclose(before - ours_var.numpy(), 0.01, rtol=1e-4)


def test_lr_bits_stays_constant_while_lr_follows_the_schedule():
    sched = dict(lr=3e-6, lr_bits=1e-3, lr_fixed=False, lr_decay=1e-4, reinit=800)
    for step in (0, 400, 799, 800, 12345):
        lr, lr_bits = rules.step_learning_rates(step, **sched)
        assert lr_bits == 1e-3
        assert lr == rules.learning_rate(step, 3e-6, lr_fixed=False, lr_decay=1e-4, reinit=800)
    # step 400: 3e-6 * exp(-0.04) * |cos(pi/8)| + 1e-7, by hand
    assert rules.step_learning_rates(400, **sched)[0] == pytest.approx(
        3e-6 * 0.9607894391523232 * 0.9238795325112867 + 1e-7, rel=1e-12)


def test_adam_epsilon_is_tf1s():
    """epsilon = 1e-8 (TF1 AdamOptimizer). TF1 adds epsilon to sqrt(v) before the bias
    correction: the first step is lr * sqrt(1-b2)/(1-b1) * (1-b1) g / (sqrt(1-b2) |g| + eps).
    With |g| = 1e-8: 0.1 * 0.0316228 / (0.0316228 + 1) = 0.0030653 (with 1e-7: 0.000315)."""
    var = tf.Variable(tf.zeros([2]))
    rules.Adam([var], "adam").apply([tf.constant([1e-8, -1e-8])], [var], 0.1)
    np.testing.assert_allclose(var.numpy(), [-0.0030653, 0.0030653], rtol=1e-3)
