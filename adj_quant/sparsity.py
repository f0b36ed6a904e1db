"""Weight sparsity: the gradual pruning schedule and magnitude masks.

**Schedule** (Zhu & Gupta 2017, "To prune, or not to prune"). Sparsity rises from
``initial`` to ``final`` over ``n`` pruning steps ``frequency`` training steps apart,
starting at step ``begin``::

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3      for t_0 <= t <= t_0 + n dt

with ``t`` rounded down to the last pruning step (the mask changes only every ``dt`` steps);
before ``t_0`` it is ``s_i``, after ``t_0 + n dt`` it stays ``s_f``. Most weights go early,
while the network can still recover, and few near the end.

**Magnitude masks.** A mask keeps the weights of largest magnitude: for sparsity ``s`` of a
tensor of ``N`` elements, ``round(s * N)`` weights with the smallest ``|w|`` become 0 (ties
broken by position, so a mask is a deterministic function of the weights). With
``global_magnitude_masks`` one threshold runs over several tensors together, so layers with
many small weights are pruned more.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """``value`` as a float in ``[0, 1)``, or one line saying what to pass."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r} is not a number; pass a fraction in [0, 1), e.g. "
                        "0.5") from None
    if not 0.0 <= number < 1.0:
        raise UserError(f"{what} {value!r} is outside [0, 1): it is the fraction of weights "
                        "set to zero; pass e.g. 0.5 (1 would remove every weight)")
    return number


def polynomial_sparsity(step, *, initial: float, final: float, begin: int, steps: int,
                        frequency: int = 1):
    """Zhu & Gupta's sparsity at training step ``step`` (a number or a scalar tensor).

    ``steps`` is ``n``, the number of pruning steps, ``frequency`` is ``dt``: the schedule
    ends at ``begin + steps * frequency``.
    """
    initial = check_sparsity(initial, "initial sparsity")
    final = check_sparsity(final, "final sparsity")
    if steps < 1 or frequency < 1 or begin < 0:
        raise UserError(f"pruning schedule begin={begin}, steps={steps}, frequency={frequency}:"
                        " pass begin >= 0 and at least one step of at least one training step")
    span = float(steps * frequency)
    t = tf.cast(step, tf.float64)
    done = tf.floor((t - begin) / frequency) * frequency  # the last pruning step reached
    progress = tf.clip_by_value(done / span, 0.0, 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def magnitude_mask(weights, sparsity) -> tf.Tensor:
    """A 0/1 mask (the dtype of ``weights``) zeroing ``round(sparsity * N)`` smallest ``|w|``.

    ``sparsity`` may be a tensor (it is not checked then); ties go to the earlier position.
    """
    w = tf.convert_to_tensor(weights)
    flat = tf.reshape(tf.abs(w), [-1])
    n = tf.size(flat)
    pruned = tf.cast(tf.round(tf.cast(sparsity, tf.float64) * tf.cast(n, tf.float64)), tf.int32)
    pruned = tf.clip_by_value(pruned, 0, n)
    # Rank every element by (|w|, position): a stable argsort gives ties to the earlier one.
    order = tf.argsort(flat, stable=True)
    rank = tf.scatter_nd(order[:, None], tf.range(n), [n])
    return tf.reshape(tf.cast(rank >= pruned, w.dtype), tf.shape(w))


def global_magnitude_masks(weights: dict, sparsity) -> dict:
    """Masks of several tensors under one magnitude threshold: ``round(sparsity * N)`` of all
    ``N`` elements together, the smallest ``|w|`` over every tensor."""
    names = list(weights)
    if not names:
        return {}
    flats = [tf.reshape(tf.convert_to_tensor(weights[k]), [-1]) for k in names]
    dtype = flats[0].dtype
    joined = tf.concat([tf.cast(f, dtype) for f in flats], 0)
    mask = tf.reshape(magnitude_mask(joined, sparsity), [-1])
    sizes = [int(f.shape[0]) for f in flats]
    parts = tf.split(mask, sizes) if len(sizes) > 1 else [mask]
    return {k: tf.reshape(tf.cast(p, flats[i].dtype), tf.shape(weights[k]))
            for i, (k, p) in enumerate(zip(names, parts))}


def zero_fraction(mask) -> float:
    """The fraction of zeros of a mask or weight tensor (a Python float)."""
    values = np.asarray(mask)
    return float(np.mean(values == 0)) if values.size else 0.0


class GradualPruner:
    """Gradual magnitude pruning of the masks of a quantized model's weight tensors.

    Every ``every`` steps from ``begin``, over ``count`` pruning steps, each mask is set to
    keep the largest ``|w|`` at :func:`polynomial_sparsity` of that step, per tensor
    (``scope="layer"``) or under one threshold (``"global"``). The schedule starts from the
    sparsity the masks have at the first update (kept in the checkpoint as ``initial``, so
    that a resumed stage continues the same schedule) and ends at ``final``.
    """

    def __init__(self, layers: dict, *, final: float, begin: int, every: int, count: int,
                 scope: str = "layer"):
        self.layers = {name: layer for name, layer in layers.items()
                       if getattr(layer, "mask", None) is not None}
        self.final = check_sparsity(final, "--sparsity")
        self.begin, self.every, self.count, self.scope = begin, every, max(1, count), scope
        self.initial = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="initial")

    @property
    def end(self) -> int:
        """The step of the last mask update: the sparsity is ``final`` from there on."""
        return self.begin + self.count * self.every

    def due(self, step: int) -> bool:
        offset = step - self.begin
        return 0 <= offset <= self.count * self.every and offset % self.every == 0

    def current_sparsity(self) -> float:
        zeros = sum(float(tf.reduce_sum(1.0 - layer.mask)) for layer in self.layers.values())
        total = sum(int(tf.size(layer.mask)) for layer in self.layers.values())
        return zeros / total if total else 0.0

    def update(self, step: int) -> float:
        """Set every mask for ``step``; returns the sparsity of the schedule there."""
        if float(self.initial) < 0:
            self.initial.assign(min(self.current_sparsity(), self.final))
        target = float(polynomial_sparsity(step, initial=float(self.initial), final=self.final,
                                           begin=self.begin, steps=self.count,
                                           frequency=self.every))
        weights = {name: layer.weights for name, layer in self.layers.items()}
        if self.scope == "global":
            masks = global_magnitude_masks(weights, target)
        else:
            masks = {name: magnitude_mask(w, target) for name, w in weights.items()}
        for name, layer in self.layers.items():
            layer.mask.assign(tf.cast(masks[name], layer.mask.dtype))
        return target


#: Width of the sigmoid whose slope stands in for the step of a learned mask, in units of
#: the layer's mean ``|w|`` (see :func:`learned_mask`).
MASK_TEMPERATURE = 0.5


def learned_mask(weights, threshold, temperature: float = MASK_TEMPERATURE) -> tf.Tensor:
    """The mask of a trainable magnitude threshold, with a straight-through gradient.

    Forward, exactly 0 or 1::

        m = 1[|w| > t * s]          s = mean |w| of the tensor (no gradient through s)

    Backward, the slope of the sigmoid the step sits in, ``z = (|w| / s - t) / T``::

        dm/dt   = -sigmoid'(z) / T
        dm/d|w| =  sigmoid'(z) / (T * s)

    So the loss moves ``t`` (a scalar per tensor, in units of its mean magnitude): the
    metric term raises it where a zero weight is worth more than it costs, and the task loss
    lowers it where the weights near the threshold matter. ``t <= 0`` keeps every nonzero
    weight.
    """
    weights = tf.convert_to_tensor(weights)
    scale = tf.maximum(tf.stop_gradient(tf.reduce_mean(tf.abs(weights))), 1e-12)

    @tf.custom_gradient
    def mask(w, t):
        hard = tf.cast(tf.abs(w) > t * scale, w.dtype)

        def grad(dy):
            sig = tf.sigmoid((tf.abs(w) / scale - t) / temperature)
            slope = dy * sig * (1.0 - sig) / temperature
            return slope * tf.sign(w) / scale, -tf.reduce_sum(slope)

        return hard, grad

    return mask(weights, tf.cast(threshold, weights.dtype))
