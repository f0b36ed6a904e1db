"""Training rules of Adjustable Quantization (docs/method.md, "The loss" and "Optimisation").

Each rule is a small function with its own test: the loss and its sign trick, the
learning-rate curve with Adam re-initialisation, the mini-epoch schedule of which
variables train, and stochastic weight averaging.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

MINI_EPOCHS = 10  # an epoch is split into 10 mini-epochs
KD_WEIGHT = 0.01
KD_EPSILON = 1e-5


# --------------------------------------------------------------------------- loss


def distillation_loss(q_logits: tf.Tensor, f_logits: tf.Tensor) -> tf.Tensor:
    """``0.01 * mean_batch(sum_classes(sqrt((q - f)^2 + 1e-5)))``; no gradient to the teacher."""
    diff = q_logits - tf.stop_gradient(f_logits)
    return KD_WEIGHT * tf.reduce_mean(tf.reduce_sum(tf.sqrt(tf.square(diff) + KD_EPSILON), -1))


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def metric_sign(metric: tf.Tensor, target: float) -> tf.Tensor:
    """``+1`` if the metric is above the target (push it down), else ``-1`` (let it grow)."""
    return tf.where(tf.stop_gradient(metric) > target, 1.0, -1.0)


def adjustable_loss(q_logits, labels, f_logits, metric, *, ce_weight: float,
                    metric_weight: float, target: float) -> dict[str, tf.Tensor]:
    """``kd + ce_weight * CE + sign * metric_weight * metric`` and its parts.

    ``ce_weight`` and ``metric_weight`` are the loss weights of the ``--alpha`` and
    ``--beta`` flags (not the quantizer's range-clip intervals r_alpha, r_beta).
    """
    kd = distillation_loss(q_logits, f_logits)
    ce = cross_entropy(q_logits, labels)
    sign = metric_sign(metric, target)
    total = kd + ce_weight * ce + sign * metric_weight * metric
    return {"loss": total, "kd": kd, "cross_entropy": ce, "metric": metric, "sign": sign}


def replica_share(parts: dict[str, tf.Tensor], fraction, replicas: int,
                  metric_weight: float = 0.0) -> dict[str, tf.Tensor]:
    """One replica's share of a step's loss parts, so that their sum over the replicas is
    the one-device value (and so is the sum of their gradients).

    The batch means (cross-entropy, KD) are weighted by ``fraction``, the replica's share of
    the global batch; the metric term depends only on the shared bits, so each replica adds
    ``1 / replicas`` of it: the MicroNet term counts once per step, not once per replica.
    """
    if replicas == 1:
        return parts
    metric_term = parts["sign"] * metric_weight * parts["metric"] if "metric" in parts else 0.0
    share = {"loss": fraction * (parts["loss"] - metric_term) + metric_term / replicas}
    for key, value in parts.items():
        if key != "loss":
            share[key] = fraction * value if key in ("kd", "cross_entropy") else value / replicas
    return share


# --------------------------------------------------------------------------- learning rate


def lr_factor(step, lr_decay: float, reinit: int):
    """``exp(-step * lr_decay) * |cos(pi * decay_step / (4 * reinit))|``,
    ``decay_step = step % reinit``."""
    decay_step = step % reinit
    return math.exp(-step * lr_decay) * abs(math.cos(math.pi * decay_step / (4 * reinit)))


def learning_rate(step: int, base_lr: float, *, lr_fixed: bool, lr_decay: float,
                  reinit: int) -> float:
    """The learning rate at global ``step`` (docs/method.md, "Optimisation")."""
    if lr_fixed:
        return base_lr
    return base_lr * lr_factor(step, lr_decay, reinit) + 1e-7


def step_learning_rates(step: int, *, lr: float, lr_bits: float, lr_fixed: bool,
                        lr_decay: float, reinit: int) -> tuple[float, float]:
    """``(lr of the weights, lr of bits_scale)`` at ``step``: the schedule applies to ``--lr``
    only; ``--lr_bits`` stays constant, as in the original."""
    return learning_rate(step, lr, lr_fixed=lr_fixed, lr_decay=lr_decay, reinit=reinit), lr_bits


def reinit_due(step: int, reinit: int, lr_fixed: bool) -> bool:
    """Adam slots are re-initialised every ``reinit`` batches (not at step 0)."""
    return not lr_fixed and step > 0 and step % reinit == 0


def slot_variables(variables: list[tf.Variable], name: str) -> list[tf.Variable]:
    """A zero-initialised variable of each of ``variables``' shape and dtype, all called
    ``name``.

    One name for all of them: creating a variable under a name the process has not used
    before is several times slower than under a used one (TensorFlow prepares a kernel per
    distinct set of op attributes, the name among them), so a name per slot made creating
    the Adam slots of a large quantized network a noticeable part of every stage's start
    (``bench/README.md``). Checkpoints address slots by their place in the object graph
    (``adam/m/17``), not by name.
    """
    return [tf.Variable(np.zeros(v.shape, v.dtype.as_numpy_dtype), trainable=False, name=name)
            for v in variables]


ADAM_EPSILON = 1e-8  # TF1's AdamOptimizer default, which the original used


class Adam(tf.Module):
    """Adam over a fixed list of variables, with slots that can be re-initialised.

    The update is TF1's ``AdamOptimizer`` (and Keras'): ``var -= lr * sqrt(1 - b2^t) /
    (1 - b1^t) * m / (sqrt(v) + epsilon)``, epsilon 1e-8 by default.
    """

    def __init__(self, variables: list[tf.Variable], name: str, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = ADAM_EPSILON):
        super().__init__(name=name)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}/iterations")
        self.m = slot_variables(variables, f"{name}/m")
        self.v = slot_variables(variables, f"{name}/v")

    def apply(self, grads: list[tf.Tensor | None], variables: list[tf.Variable], lr) -> None:
        """One Adam step of every variable with a gradient (``None`` gradients are skipped).

        Each update is TensorFlow's fused ``ResourceApplyAdam`` kernel, the one TF1's
        ``AdamOptimizer`` ran: one op per variable instead of a dozen, which matters with
        a thousand small quantizer variables (graph size, tracing and per-op overhead).
        It computes ``m += (g - m)(1 - b1)``, the same moment as ``b1 m + (1 - b1) g`` up to
        float32 rounding.

        Under a ``tf.distribute`` strategy it is called in cross-replica context with
        gradients already summed over the replicas; every replica's copy of a variable gets
        the same update (``strategy.extended.update``).
        """
        self.iterations.assign_add(1)
        t = tf.cast(self.iterations, tf.float32)
        beta_1, beta_2 = tf.constant(self.beta_1, tf.float32), tf.constant(self.beta_2, tf.float32)
        constants = dict(beta1_power=tf.pow(beta_1, t), beta2_power=tf.pow(beta_2, t),
                         lr=tf.cast(lr, tf.float32), beta1=beta_1, beta2=beta_2,
                         epsilon=tf.constant(self.epsilon, tf.float32))
        strategy = tf.distribute.get_strategy()
        for g, var, m, v in zip(grads, variables, self.m, self.v):
            if g is None:
                continue
            strategy.extended.update(var, _apply_adam, args=(m, v, g), kwargs=constants,
                                     group=False)

    def reset(self) -> None:
        """Re-initialise the slots: Adam starts afresh, bias correction included."""
        self.iterations.assign(0)
        for slot in self.m + self.v:
            slot.assign(tf.zeros_like(slot))


def _apply_adam(var, m, v, grad, **constants):
    """TensorFlow's fused Adam kernel on one device's copy of ``var`` and its slots."""
    return tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle,
                                        grad=tf.convert_to_tensor(grad), **constants)


# --------------------------------------------------------------------------- mini-epochs


@dataclasses.dataclass(frozen=True)
class ScheduleFlags:
    bits_trainable: bool = False
    finetune: bool = False
    warm_up_epoch: float = 0.0
    iter_train: bool = False
    iter_train_freq: int = 2


def train_bits_in(epoch: int, k: int, flags: ScheduleFlags) -> bool:
    """Whether ``bits_scale`` trains in mini-epoch ``k`` (0..9) of ``epoch`` (docs/method.md).

    The rules, in order: no trainable bits -> (nothing to train); --finetune -> no;
    ``e + k/10 < warm_up_epoch`` -> no; --iter_train and ``k % iter_train_freq != 0`` -> no;
    otherwise yes.
    """
    if not flags.bits_trainable or flags.finetune:
        return False
    if epoch + k / MINI_EPOCHS < flags.warm_up_epoch - 1e-9:
        return False
    if flags.iter_train and k % flags.iter_train_freq != 0:
        return False
    return True


def total_mini_epochs(max_epoch: float) -> int:
    """``--max_epoch`` in mini-epochs: 0.3 means three."""
    return int(round(max_epoch * MINI_EPOCHS))


def mini_epoch_bounds(steps_per_epoch: int) -> list[int]:
    """Step boundaries of the 10 mini-epochs of an epoch (11 numbers, first 0, last all)."""
    return [round(i * steps_per_epoch / MINI_EPOCHS) for i in range(MINI_EPOCHS + 1)]


def schedule_table(max_epoch: float, flags: ScheduleFlags) -> list[tuple[int, int, bool]]:
    """``(epoch, k, trains_bits)`` for every mini-epoch of the run."""
    return [(i // MINI_EPOCHS, i % MINI_EPOCHS,
             train_bits_in(i // MINI_EPOCHS, i % MINI_EPOCHS, flags))
            for i in range(total_mini_epochs(max_epoch))]


# --------------------------------------------------------------------------- SWA


def swa_snapshot_due(epoch: int, k: int, swa_delay: float | None, swa_freq: float) -> bool:
    """Snapshot after mini-epoch ``k`` of ``epoch``: ``e + k/10 >= delay``, ``k > 0``,
    ``k % int(10*freq) == 0``."""
    if swa_delay is None:
        return False
    period = int(round(MINI_EPOCHS * swa_freq))
    return epoch + k / MINI_EPOCHS >= swa_delay - 1e-9 and k > 0 and k % period == 0


class WeightAverager(tf.Module):
    """Running mean of snapshots of a list of variables (checkpointable).

    It holds only the means, not the variables themselves, so that a checkpoint keeps
    finding the model's variables under the model.
    """

    def __init__(self, variables: list[tf.Variable]):
        super().__init__(name="swa")
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="swa/count")
        self.mean = slot_variables(variables, "swa/mean")

    def snapshot(self, variables: list[tf.Variable]) -> None:
        self.count.assign_add(1)
        n = tf.cast(self.count, tf.float32)
        for mean, var in zip(self.mean, variables, strict=True):
            mean.assign_add((var - mean) / n)

    def assign_average(self, variables: list[tf.Variable]) -> bool:
        """Give the variables the averaged values; ``False`` when there was no snapshot."""
        if int(self.count.numpy()) == 0:
            return False
        for mean, var in zip(self.mean, variables, strict=True):
            var.assign(mean)
        return True


# --------------------------------------------------------------------------- accuracy


def topk_correct(logits: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    k = min(k, int(logits.shape[-1]))
    return tf.reduce_sum(tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32), logits, k), tf.int32))


def is_finite(value) -> bool:
    return bool(np.all(np.isfinite(np.asarray(value))))


# --------------------------------------------------------------------------- frozen betas


def _shift_absorbed(net, name: str, consumers: dict, dropout_rate: float,
                    drop_connect_rate: float) -> bool:
    """Whether a per-channel constant added to node ``name``'s output is removed, on every
    path, by a training-mode batch norm: it passes only through ops that keep it a
    per-channel constant over the batch and the image (adds without drop-connect on that
    input, pooling, an inactive dropout) and ends in 1x1 layers with batch norm."""
    if name == net.nodes[-1].name:
        return False
    for node, position in consumers.get(name, ()):
        if node.op in ("conv", "dws", "fc"):
            # A kxk kernel with padding turns a constant into one that differs at the
            # border, which the batch mean does not remove.
            if not (node.batch_norm and node.kernel == 1):
                return False
            continue
        if node.op == "add":
            dropped = position == 0 and node.drop_path and \
                drop_connect_rate * node.drop_path[0] / node.drop_path[1] > 0
            if dropped:
                return False
        elif node.op == "dropout":
            if dropout_rate > 0:
                return False
        elif node.op not in ("gap", "maxpool"):
            return False  # a nonlinearity, a product, padding
        if not _shift_absorbed(net, node.name, consumers, dropout_rate, drop_connect_rate):
            return False
    return True


def untrainable_betas(net, *, dropout_rate: float = 0.0,
                      drop_connect_rate: float = 0.0) -> list[str]:
    """The layers whose batch-norm ``beta`` has a structurally zero gradient in training.

    A batch norm's ``beta`` adds a per-channel constant to its output. When every path from
    there reaches another batch-normalised layer only through ops that keep that constant a
    constant (:func:`_shift_absorbed`), the next batch norm subtracts it again with the
    batch mean: the loss does not depend on ``beta``. What autodiff computes for it is
    float round-off whose sign depends on the order of summation (one device or an
    all-reduce), and Adam turns that noise into steps of up to ``lr``. So such a ``beta`` is
    not trained (docs/method.md, "Optimisation"). In EfficientNet-B0 these are the
    ``project`` convolutions, which feed 1x1 ``expand`` convolutions through residual adds.
    """
    consumers: dict[str, list] = {}
    for node in net.nodes:
        for position, name in enumerate(net.inputs_of(node)):
            consumers.setdefault(name, []).append((node, position))
    return [node.name for node in net.nodes
            if node.op in ("conv", "dws", "fc") and node.batch_norm and
            _shift_absorbed(net, node.name, consumers, dropout_rate, drop_connect_rate)]
