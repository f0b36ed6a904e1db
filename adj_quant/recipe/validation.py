"""Accuracy and scores of a model, shared by training (validation) and ``eval.py``."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adj_quant import cost as cost_lib
from adj_quant import graph_options
from adj_quant.distribution import is_distributed, reduce_sum, split_batch
from adj_quant.qnetwork import ACTIVATION_SITES, is_quantized
from adj_quant.recipe import data as data_lib
from adj_quant.training_rules import topk_correct


def make_eval_step(model, strategy: tf.distribute.Strategy | None = None):
    """``step(images, labels) -> (top-1 hits, top-5 hits)`` of one batch, split over the
    replicas of ``strategy`` (default: the current one) and summed."""
    strategy = strategy or tf.distribute.get_strategy()

    def hits(images, labels):
        logits = model(images, training=False)
        return topk_correct(logits, labels, 1), topk_correct(logits, labels, 5)

    @tf.function(reduce_retracing=True, autograph=False)
    def replicated(images, labels):
        top1, top5 = strategy.run(hits, (images, labels))
        return reduce_sum(strategy, top1), reduce_sum(strategy, top5)

    if not is_distributed(strategy):
        if is_quantized(model):
            return QuantizedEvalStep(model)
        return _traced_once(hits)
    return lambda images, labels: replicated(*split_batch(strategy, images, labels))


class QuantizedEvalStep:
    """:func:`make_eval_step` of a quantized model on one device. Within :meth:`one_pass`
    (what :func:`accuracy` runs in) the weights are quantized once, at the first batch, and
    every batch computes with them: the weight quantizers then run once per pass over the
    data instead of once per batch (a third of a batch's time for EfficientNet-B0 at 32
    pixels), with the same results. Outside a pass each call quantizes them itself."""

    def __init__(self, model):
        self.model = model
        self._parameters = tf.function(model.quantized_parameters, autograph=False)
        self._hits = _traced_once(self._batch_hits)
        self._fixed = None  # (img_size, parameters) of the current pass
        self._in_pass = False

    def _batch_hits(self, images, labels, parameters):
        logits = self.model(images, training=False, parameters=parameters)
        return topk_correct(logits, labels, 1), topk_correct(logits, labels, 5)

    @contextlib.contextmanager
    def one_pass(self):
        """The weights do not change until the end of the block."""
        self._in_pass, self._fixed = True, None
        try:
            yield
        finally:
            self._in_pass, self._fixed = False, None

    def __call__(self, images, labels):
        size = int(images.shape[1] or 224)
        if self._fixed is None or self._fixed[0] != size:
            fixed = (size, self._parameters(size))
            self._fixed = fixed if self._in_pass else None
        else:
            fixed = self._fixed
        return self._hits(images, labels, fixed[1])


def _traced_once(fn):
    """``fn(images, labels)`` as a ``tf.function`` traced once: a batch smaller than the
    first one (the last batch of the validation data) is padded to the first one's size
    with black images labelled -1, which no top-k counts (``tf.math.in_top_k`` is false for
    a label out of range). Without it, that batch traced the step a second time, a few
    seconds of every stage; tracing with the batch size unknown instead made every later
    validation a quarter slower."""
    function = tf.function(fn, autograph=False)
    size = None

    def call(images, labels, *more):
        nonlocal size
        n = int(images.shape[0])
        size = size or n
        if n < size:
            images = tf.concat([images, tf.zeros([size - n, *images.shape[1:]], images.dtype)], 0)
            labels = tf.concat([labels, tf.fill([size - n], tf.constant(-1, labels.dtype))], 0)
        return function(images, labels, *more)

    return call


def accuracy(model, dataset, *, what: str = "validation data", progress: bool = True,
             max_images: int | None = None, step=None, desc: str = "validate") -> dict[str, float]:
    """Top-1 / top-5 (fractions) of ``model`` over ``dataset``.

    ``step(images, labels) -> (top1_hits, top5_hits)`` counts one batch; by default it runs
    ``model`` in a ``tf.function`` (other runners, e.g. the TFLite interpreter, pass theirs).
    """
    step = step or make_eval_step(model)
    top1 = top5 = seen = 0
    bar = tqdm(desc=desc, unit="img", disable=not progress, leave=False, total=max_images)
    one_pass = getattr(step, "one_pass", contextlib.nullcontext)
    with graph_options.lean_grappler(), one_pass():
        for images, labels in data_lib.iterate(dataset, what):
            if max_images is not None:
                images, labels = images[: max_images - seen], labels[: max_images - seen]
            c1, c5 = step(images, labels)
            top1, top5 = top1 + int(c1), top5 + int(c5)
            seen += int(labels.shape[0])
            bar.update(int(labels.shape[0]))
            if max_images is not None and seen >= max_images:
                break
    bar.close()
    if seen == 0:
        return {"top1": float("nan"), "top5": float("nan"), "images": 0}
    return {"top1": top1 / seen, "top5": top5 / seen, "images": seen}


def bits_of(model):
    """The model's current bits; the float model is 32 bits everywhere."""
    return cost_lib.bits_of(model)


def scores(bits, arch, img_size: int) -> dict[str, float]:
    """Official counts (params, ops, score_micronet), score_adjq and average bits
    (:func:`adj_quant.cost.cost_report` as a dict)."""
    return cost_lib.cost_report(bits, img_size, arch=arch).as_dict()


def bits_histograms(model, bits: dict[str, tf.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Per-channel bits of all weight and all activation quantizers (for TensorBoard).
    ``bits``: every quantizer's bits by name, read beforehand (``model.bits_reader()``)."""
    if not is_quantized(model):
        return {}
    quantizers = model.quantizers()
    bits = bits or {name: quant.bits() for name, quant in quantizers.items()}
    weights, acts = [], []
    for name in quantizers:
        if name.endswith("/weights"):
            weights.append(bits[name].numpy())
        elif name.endswith(ACTIVATION_SITES):
            acts.append(bits[name].numpy())
    return {"bits/weights": np.concatenate(weights), "bits/activations": np.concatenate(acts)}
