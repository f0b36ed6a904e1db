"""The training loop: mini-epochs, two optimizers, validation, checkpoints, SWA, TensorBoard.

One :class:`Trainer` runs one stage in its own directory. Re-running it on a directory
with an unfinished run resumes from the latest checkpoint: same mini-epoch, same
optimizer slots, same data order and dropout stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adj_quant import cost as cost_lib
from adj_quant import distribution, graph_options
from adj_quant import training_rules as rules
from adj_quant.checkpoints import (
    CorruptCheckpoint,
    RunCheckpoints,
    WorkerCheckpoints,
    all_finite,
    reading,
)
from adj_quant.errors import UserError
from adj_quant.files import is_disk_full
from adj_quant.qnetwork import is_quantized
from adj_quant.recipe import data as data_lib
from adj_quant.recipe import validation
from adj_quant.recipe.config import Options
from adj_quant.recipe.plots import BitsPlot, layer_average_bits, layer_sparsity
from adj_quant.sparsity import GradualPruner

LOG_EVERY = 10
#: Without ``--max_loss``, a loss above this multiple of the stage's first mini-epoch mean
#: loss counts as divergence.
DIVERGENCE_FACTOR = 1e6


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or Inf, or training diverged while finite."""


def collapsed(top1_history: list[float], num_classes: int, patience: int) -> bool:
    """Validation top-1 was above chance once and has been at chance level (at most
    1.5 / num_classes) for the last ``patience`` mini-epochs."""
    chance = 1.5 / num_classes
    if patience <= 0 or len(top1_history) <= patience:
        return False
    earlier, recent = top1_history[:-patience], top1_history[-patience:]
    return max(earlier) > 2 * chance and all(t <= chance for t in recent)


@dataclasses.dataclass
class StageResult:
    best_path: str | None
    best: dict
    final: dict


class StageClock:
    """Wall seconds of a stage's training loop, by what they were spent on.

    ``tracing``: building each step function's graph (``get_concrete_function``);
    ``first calls``: each step function's first call, graph optimization and XLA
    compilation of its kernels included; ``steps``: every later step; ``data``: waiting for
    batches; ``epoch data``: an epoch's input pipeline, and letting go of the last one;
    ``validation`` (the first one traces its evaluation step); ``checkpoints``;
    ``summaries`` (TensorBoard, the per-layer bits plot).
    """

    PARTS = ("tracing", "first calls", "steps", "data", "epoch data", "validation",
             "checkpoints", "summaries")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def line(self) -> str:
        """``1,234 s: steps 900, first calls 40, ...``: the loop's total, then each part."""
        total = time.perf_counter() - self.started
        other = total - sum(self.seconds.values())
        parts = sorted(self.seconds.items(), key=lambda kv: -kv[1]) + [("other", other)]
        return f"{total:,.0f} s: " + ", ".join(f"{k} {v:,.1f}" for k, v in parts)


def _untrained_betas(model) -> list[tf.Variable]:
    """The batch-norm betas of a float model whose gradient is structurally zero
    (:func:`adj_quant.training_rules.untrainable_betas`): they keep their values."""
    layers, arch = getattr(model, "layers", None), getattr(model, "arch", None)
    if is_quantized(model) or not isinstance(layers, dict) or arch is None:
        return []
    scopes = rules.untrainable_betas(arch, dropout_rate=getattr(model, "dropout_rate", 0.0),
                                     drop_connect_rate=getattr(model, "drop_connect_rate", 0.0))
    return [layers[s].bn.beta for s in scopes]


def pruned_best_key(best_key=None):
    """Rank the checkpoints of a pruning stage: those written once the schedule reached its
    final sparsity first (an early, denser checkpoint is not the stage's result), then by
    ``best_key`` (default: top-1)."""
    inner = best_key or (lambda entry: entry.get("top1", 0.0))
    return lambda entry: (bool(entry.get("pruning_done")), inner(entry))


class Trainer:
    """Train ``model`` for one stage.

    ``teacher`` (a float model) turns on the adjustable loss (KD + ce_weight * CE + the
    metric term; the weights are the ``--alpha`` and ``--beta`` flags);
    without it the loss is plain cross-entropy (float pretraining).

    It trains under the ``tf.distribute`` strategy in whose scope it is built (the model's
    too): each step splits the global batch over the replicas and sums their gradients.
    Only the chief writes into ``stage_dir``.
    """

    def __init__(self, model, options: Options, stage_dir: str, *, teacher=None,
                 best_key=None, stage: str = "train"):
        self.model, self.o, self.stage_dir, self.teacher = model, options, stage_dir, teacher
        self.stage = stage
        self.best_key = best_key
        self.strategy = tf.distribute.get_strategy()
        self.chief = distribution.is_chief(self.strategy)
        self.info = data_lib.dataset_info(*data_lib.data_args(options))
        self.steps_per_epoch = self.info.num_train // options.batch_size
        if self.steps_per_epoch < rules.MINI_EPOCHS:
            raise UserError(f"--batch_size {options.batch_size} leaves "
                            f"{self.steps_per_epoch} steps per epoch for "
                            f"{self.info.num_train} training images; an epoch needs at least "
                            f"{rules.MINI_EPOCHS} (one per mini-epoch): lower --batch_size")
        self.metric_img_size = options.metric_size
        # The learned magnitude thresholds train with the bits, by the same metric term.
        bits_vars = model.bits_variables() + model.sparsity_variables() \
            if is_quantized(model) else []
        skip = {id(v) for v in bits_vars} | {id(v) for v in _untrained_betas(model)}
        self.weight_vars = [v for v in model.trainable_variables if id(v) not in skip]
        self.bits_vars = bits_vars
        self.opt = rules.Adam(self.weight_vars, "adam")
        self.bits_opt = rules.Adam(self.bits_vars, "adam_bits")
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.mini_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.swa = rules.WeightAverager(model.trainable_variables)
        self.pruner = self._make_pruner()
        self.learned = is_quantized(model) and bool(model.sparsity_variables())
        if self.pruner is not None:
            self.best_key = pruned_best_key(best_key)
        self.checkpoint = tf.train.Checkpoint(
            model=model, adam=self.opt, adam_bits=self.bits_opt, global_step=self.global_step,
            mini_epoch=self.mini_epoch, swa=self.swa,
            **({"prune_initial": self.pruner.initial} if self.pruner else {}))
        job, index = distribution.task(self.strategy)
        self.ckpts = (RunCheckpoints(stage_dir, keep=options.keep_checkpoints) if self.chief
                      else WorkerCheckpoints(stage_dir, options.keep_checkpoints,
                                             f"{job}{index}"))
        self.flags = rules.ScheduleFlags(
            bits_trainable=bool(bits_vars), finetune=options.finetune,
            warm_up_epoch=options.warm_up_epoch or 0.0, iter_train=options.iter_train,
            iter_train_freq=options.iter_train_freq)
        self._train_step = None
        self._fixed_metric = None  # the metric term, where no step changes it (train_step)
        self._cost = None       # (fingerprint of the bits, their CostReport)
        self._bits_png = None   # (the per-layer averages plotted, their pixels)
        self._plot = None       # the BitsPlot, made at its first drawing
        self._called = False    # the step function has run once
        self.top1_history: list[float] = []
        self._eval_step = validation.make_eval_step(model, self.strategy)
        self._read_bits = None  # model.bits_reader(), made at the first report
        self.writer = (tf.summary.create_file_writer(stage_dir) if self.chief
                       else tf.summary.create_noop_writer())
        self.val_data = data_lib.validation_data(options, self.info.num_classes)
        self.file_shard, self.worker_batch = self._file_shard()

    def _make_pruner(self) -> GradualPruner | None:
        """Gradual magnitude pruning of the masks over this stage (``--sparsity``; the
        masks stay as they are in finetune)."""
        o = self.o
        if not (is_quantized(self.model) and self.model.qcfg.pruned and o.sparsity > 0
                and not o.finetune):
            return None
        bounds = rules.mini_epoch_bounds(self.steps_per_epoch)
        total = sum(bounds[i % rules.MINI_EPOCHS + 1] - bounds[i % rules.MINI_EPOCHS]
                    for i in range(rules.total_mini_epochs(o.max_epoch)))
        begin = int(round(o.prune_start * total))
        end = max(begin + 1, int(round(o.prune_end * total)))
        # The depthwise kernels (9 weights a channel) and the stem stay dense: pruning them
        # removes whole channels early, and they hold few of the MACs.
        layers = {name: layer for name, layer in self.model.layers.items() if layer.prunable}
        return GradualPruner(layers, final=o.sparsity, begin=begin,
                             every=o.prune_every, count=(end - begin) // o.prune_every,
                             scope=o.prune_scope)

    def _learned_sparsity(self) -> float:
        """The fraction of zero weights over the layers with a learned threshold."""
        layers = [layer for layer in self.model.layers.values()
                  if layer.prune_threshold is not None]
        zeros = sum(float(tf.reduce_sum(1.0 - layer.current_mask())) for layer in layers)
        return zeros / sum(int(tf.size(layer.weights)) for layer in layers)

    # ------------------------------------------------------------------ steps

    def _loss(self, images, labels, training):
        logits = self.model(images, training=training)
        if self.teacher is None:
            ce = rules.cross_entropy(logits, labels)
            return {"loss": ce, "cross_entropy": ce}
        f_logits = self.teacher(images, training=False)
        metric = self._fixed_metric
        if metric is None:
            metric = self._metric()
        # --alpha and --beta are the loss weights of the cross-entropy and the metric term
        return rules.adjustable_loss(logits, labels, f_logits, metric, ce_weight=self.o.alpha,
                                     metric_weight=self.o.beta, target=self.o.metric)

    def _metric(self) -> tf.Tensor:
        """The loss's metric term: the model's MicroNet score at its current bits and
        densities, float32 (differentiable with respect to them)."""
        counts = cost_lib.micronet_cost(self.model, self.metric_img_size,
                                        style=self.o.metric_style, gamma=self.o.gamma)
        return tf.cast(counts.score, tf.float32)

    def _metric_is_fixed(self) -> bool:
        """Nothing in this stage changes the bits or the densities: fixed bits (qat8) or
        bits not trained (finetune), no pruning schedule, no learned thresholds."""
        return (self.teacher is not None and not self._bits_train() and self.pruner is None
                and not self.learned)

    def _bits_train(self) -> bool:
        """The stage's steps train the bits (not in finetune, which freezes them)."""
        return self.flags.bits_trainable and not self.flags.finetune

    def train_step(self):
        """The step function: ``step(images, labels, lr, lr_bits, train_bits) -> loss parts``,
        with ``images`` and ``labels`` split over the replicas (:meth:`split`) and
        ``train_bits`` a bool tensor: whether the bits optimizer takes a step too.

        One function serves the mini-epochs that train the bits and those that do not (the
        bits' update sits in a ``tf.cond``), so a stage traces and first-calls one graph,
        not two. In a stage whose bits can train, the gradients of the bits are computed at
        every step and used where ``train_bits`` is true; the weights' gradients and
        updates are the same ops either way."""
        if self._train_step is None:
            # A metric that no step changes is counted once, here, and enters the traced
            # step as a value: the count's graph (thousands of small ops, a third to over
            # half of a quantized step's graph) is then traced only where bits or densities
            # train. The weights' gradients do not depend on it, and the loss is the same
            # but for its last bit where grappler folded a constant count into the loss
            # differently (qat8 on digits: mean losses within 2e-8 of the in-step ones).
            if self._metric_is_fixed():
                self._fixed_metric = self._metric()
            bits_train = self._bits_train()
            variables = self.weight_vars + (self.bits_vars if bits_train else [])
            strategy = self.strategy
            replicas = strategy.num_replicas_in_sync
            metric_weight = self.o.beta if self.teacher is not None else 0.0

            def replica_step(images, labels):
                with tf.GradientTape() as tape:
                    parts = rules.replica_share(
                        self._loss(images, labels, training=True),
                        distribution.replica_fraction(images, self.o.batch_size), replicas,
                        metric_weight)
                grads = tape.gradient(parts["loss"], variables)
                if replicas > 1:
                    grads = distribution.all_reduce_sum(grads)
                return parts, grads

            def step(images, labels, lr, lr_bits, train_bits):
                parts, grads = strategy.run(replica_step, (images, labels))
                n = len(self.weight_vars)
                with strategy.scope():  # the optimizers update every replica's copy
                    self.opt.apply(grads[:n], self.weight_vars, lr)
                    if bits_train:
                        def bits_update():
                            self.bits_opt.apply(grads[n:], self.bits_vars, lr_bits)
                            return tf.constant(True)

                        tf.cond(train_bits, bits_update, lambda: tf.constant(False))
                if replicas == 1:
                    return parts
                return {k: distribution.reduce_sum(strategy, v) for k, v in parts.items()}

            # No AutoGraph: the step and the model have no tensor-dependent Python control
            # flow, and converting the network's code costs seconds of tracing per stage.
            self._train_step = tf.function(step, jit_compile=self.o.jit_compile,
                                           autograph=False)
        return self._train_step

    # ------------------------------------------------------------------ data

    def _file_shard(self) -> tuple[tuple[int, int] | None, int]:
        """``((workers, index), this worker's rows of a global batch)`` when each worker
        reads its own TFRecord files, else ``(None, --batch_size)`` (one process, or
        digits/synthetic data: every worker builds the global batch)."""
        name, dataset_dir = data_lib.data_args(self.o)[:2]
        workers, index = distribution.input_pipelines(self.strategy)
        if name != "imagenet" or workers == 1:
            return None, self.o.batch_size
        files = data_lib.shard_files(dataset_dir, "train")
        if len(files) < workers:
            print(f"warning: [{self.stage}] {len(files)} train shard(s) for {workers} workers: "
                  "every worker reads all of them and keeps its rows of the global batch "
                  f"(write at least {workers} shards to shard by file)", file=sys.stderr)
            return None, self.o.batch_size
        start, stop = distribution.replica_rows(self.o.batch_size, workers, index)
        print(f"[{self.stage}] worker {index} of {workers} reads "
              f"{len(data_lib.files_of_shard(files, workers, index))} of {len(files)} train "
              f"shards, {stop - start} images of each global batch")
        return (workers, index), stop - start

    def _epoch_batches(self, epoch: int, skip: int):
        """The training batches of ``epoch`` after the first ``skip``: the global batch,
        or with file sharding this worker's part of it from its own files (repeated, so
        that no worker runs out before the epoch's step count)."""
        name, dataset_dir = data_lib.data_args(self.o)[:2]
        shard = self.file_shard
        ds = data_lib.make_dataset(
            name, "train", batch_size=self.worker_batch, img_size=self.o.img_size,
            training=True, seed=self.o.seed * 100003 + epoch, dataset_dir=dataset_dir,
            labels_offset=self.o.labels_offset, num_classes=self.info.num_classes,
            drop_remainder=True, augment=self.o.augment, eval_crop=self.o.eval_crop,
            shard=shard, repeat=shard is not None)
        return data_lib.iterate(ds.skip(skip), "training data")

    # ------------------------------------------------------------------ run

    def restore_if_resuming(self) -> bool:
        """Resume from the latest checkpoint; a damaged one (unreadable, or holding NaN/Inf)
        is skipped for the one before it, with a line saying so."""
        if self.ckpts.finished:
            return False
        while (latest := self.ckpts.latest()) is not None:
            try:
                with reading(latest):
                    self.checkpoint.read(latest).assert_consumed()
                if not all_finite(self.model.variables):
                    raise CorruptCheckpoint(latest, "it holds NaN or Inf values")
            except CorruptCheckpoint as err:
                self.ckpts.discard(os.path.basename(latest), self.best_key)
                earlier = self.ckpts.latest()
                if earlier is None:
                    raise UserError(f"[{self.stage}] cannot resume: {latest} is corrupt "
                                    f"({err.reason}) and no earlier checkpoint is intact; delete "
                                    f"{self.stage_dir} (or use another --run_dir) to start the "
                                    "stage over") from None
                print(f"[{self.stage}] {latest} is corrupt ({err.reason}); resuming from "
                      f"{earlier} instead", file=sys.stderr)
                continue
            print(f"[{self.stage}] resuming from {latest} "
                  f"(mini-epoch {int(self.mini_epoch.numpy())})")
            return True
        return False

    def _last_good(self) -> str:
        try:  # a checkpoint still being written is good once its files are complete
            self.ckpts.wait()
        except (OSError, tf.errors.OpError):
            pass  # not the error being reported; the pointers went back to the one before
        return self.ckpts.latest() or "none (nothing was saved yet)"

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"[{self.stage}] {what}; training stopped. The last good checkpoint is "
            f"{self._last_good()}; lower --lr / --lr_bits and rerun")

    def _save(self, name: str, info: dict, checked: bool = False) -> None:
        """Write a checkpoint, but only of a finite model (``checked``: the caller has just
        checked); a full disk ends in one line."""
        if not checked and not all_finite(self.model.variables):
            raise self._diverged("the weights became NaN or Inf")
        if self.learned:  # the checkpoint's masks are the ones the thresholds give
            self.model.freeze_masks()
        with self._disk_full_is_one_line():
            self.ckpts.save(self.checkpoint, name, info, best_key=self.best_key,
                            background=True)

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        """A full disk while writing checkpoints (:meth:`_save`, also one being written in
        the background: ``RunCheckpoints.wait``) ends in one line."""
        try:
            yield
        except (OSError, tf.errors.OpError) as err:
            if not is_disk_full(err):
                raise
            raise UserError(f"[{self.stage}] no space left on device while writing "
                            f"{self.stage_dir}; the last intact checkpoint is {self._last_good()}."
                            " Free some space and rerun the same command to resume") from None

    def run(self) -> StageResult:
        """Train the stage to its end (or resume it), validating and saving as it goes."""
        self.clock = StageClock()
        with graph_options.lean_grappler():
            result = self._run()
        if self.chief:
            print(f"[{self.stage}] training loop time {self.clock.line()}")
        return result

    def _run(self) -> StageResult:
        o = self.o
        total = rules.total_mini_epochs(o.max_epoch)
        bounds = rules.mini_epoch_bounds(self.steps_per_epoch)
        with self.clock.part("summaries"):
            self._write_hparams()
        start = int(self.mini_epoch.numpy())
        batches = None
        last = {}
        for i in range(start, total):
            epoch, k = divmod(i, rules.MINI_EPOCHS)
            if batches is None or k == 0:
                with self.clock.part("epoch data"):
                    batches = self._epoch_batches(epoch, bounds[k])
            train_bits = rules.train_bits_in(epoch, k, self.flags)
            mean_loss = self._train_mini_epoch(i, total, batches, bounds[k + 1] - bounds[k],
                                               train_bits)
            if not all_finite(self.model.variables):
                raise self._diverged(f"the weights became NaN or Inf in mini-epoch {i + 1}")
            self.mini_epoch.assign(i + 1)
            with self.clock.part("validation"):
                last = self.validate()
            if rules.swa_snapshot_due(epoch, k, o.swa_delay, o.swa_freq):
                self.swa.snapshot(self.model.trainable_variables)
            name = f"me{i + 1:04d}_metric{last['metric']:.4f}_top1-{100 * last['top1']:.2f}"
            info = dict(last, mini_epoch=i + 1, mean_loss=mean_loss)
            if self.pruner is not None:
                info.update(sparsity=self.pruner.current_sparsity(),
                            pruning_done=int(self.global_step.numpy()) > self.pruner.end)
            elif self.learned:
                info.update(sparsity=self._learned_sparsity())
            if self.ckpts.state.get("reference_loss") is None and mean_loss is not None:
                self.ckpts.state["reference_loss"] = mean_loss
            with self.clock.part("checkpoints"):
                self._save(name, info, checked=True)
            self._check_collapse(last["top1"])
            with self.clock.part("summaries"):
                self._summaries(last, i + 1)
            print(f"[{self.stage}] mini-epoch {i + 1}/{total}: top-1 {100 * last['top1']:.2f}%  "
                  f"metric {last['metric']:.4f}  bits w/a {last['avg_weight_bits']:.2f}/"
                  f"{last['avg_act_bits']:.2f}{'  (bits trained)' if train_bits else ''}")
        with self._disk_full_is_one_line():
            self.ckpts.wait()
        if not last and self.ckpts.latest():
            last = next(e for e in self.ckpts.entries() if e["name"] == self.ckpts.state["latest"])
        swa_due = o.swa_delay is not None and not self.ckpts.finished
        if swa_due and self.swa.assign_average(self.model.trainable_variables):
            with self.clock.part("validation"):
                last = self.validate()
            name = f"swa_metric{last['metric']:.4f}_top1-{100 * last['top1']:.2f}"
            with self.clock.part("checkpoints"):
                self._save(name, dict(last, swa=int(self.swa.count.numpy())))
            self.ckpts.set_best(name)
            with self.clock.part("summaries"):
                self._summaries(last, total + 1)
            print(f"[{self.stage}] SWA of {int(self.swa.count.numpy())} snapshots: top-1 "
                  f"{100 * last['top1']:.2f}%  metric {last['metric']:.4f}")
        self.ckpts.mark_finished()
        self.writer.flush()
        best_name = self.ckpts.state["best"]
        best = next((e for e in self.ckpts.entries() if e["name"] == best_name), {})
        return StageResult(self.ckpts.best(), best, last)

    def loss_bound(self) -> float | None:
        """The divergence bound: ``--max_loss``, else a multiple of the first mean loss."""
        if self.o.max_loss is not None:
            return self.o.max_loss
        reference = self.ckpts.state.get("reference_loss")
        return None if reference is None else DIVERGENCE_FACTOR * max(abs(reference), 1e-3)

    def _check_collapse(self, top1: float) -> None:
        self.top1_history.append(top1)
        if collapsed(self.top1_history, self.info.num_classes, self.o.collapse_patience):
            raise self._diverged(
                f"validation top-1 fell to chance level ({100 * top1:.2f}%) for "
                f"{self.o.collapse_patience} mini-epochs (--collapse_patience)")

    def _train_mini_epoch(self, index, total, batches, steps, train_bits) -> float | None:
        """Train one mini-epoch; returns its mean loss (None if it had no steps)."""
        o = self.o
        step_fn = self.train_step()
        bound = self.loss_bound()
        losses = []
        bar = tqdm(total=steps, desc=f"{self.stage} {index + 1}/{total}", unit="step",
                   disable=not (o.progress and self.chief), leave=False)
        for _ in range(steps):
            try:
                with self.clock.part("data"):
                    images, labels = next(batches)
            except StopIteration:
                break
            step = int(self.global_step.numpy())
            if self.pruner is not None and self.pruner.due(step):
                self.pruner.update(step)
            if rules.reinit_due(step, o.reinit, o.lr_fixed):
                self.opt.reset()
                self.bits_opt.reset()
            lr, lr_bits = rules.step_learning_rates(step, lr=o.lr, lr_bits=o.lr_bits,
                                                    lr_fixed=o.lr_fixed, lr_decay=o.lr_decay,
                                                    reinit=o.reinit)
            images, labels = distribution.split_batch(self.strategy, images, labels,
                                                      per_worker=self.file_shard is not None)
            args = (images, labels, tf.constant(lr, tf.float32),
                    tf.constant(lr_bits, tf.float32), tf.constant(train_bits))
            first = not self._called
            if first and not distribution.is_distributed(self.strategy):
                with self.clock.part("tracing"):  # the call below reuses this trace
                    step_fn.get_concrete_function(*args)
            with self.clock.part("first calls" if first else "steps"), \
                    graph_options.training_grappler():
                parts = step_fn(*args)
                loss = float(parts["loss"].numpy())
            self._called = True
            if not rules.is_finite(loss):
                raise self._diverged(f"the loss became {loss} at step {step}")
            if bound is not None and loss > bound:
                raise self._diverged(
                    f"the loss reached {loss:.4g} at step {step}, above the divergence bound "
                    f"{bound:.4g} (--max_loss, default 1e6 x the first mini-epoch's mean loss)")
            losses.append(loss)
            if train_bits:
                self._check_replicas_agree(step)
            self.global_step.assign_add(1)
            if step % LOG_EVERY == 0:
                with self.writer.as_default(step=step):
                    for key, value in parts.items():
                        tf.summary.scalar(f"loss/{key}", value)
                    tf.summary.scalar("lr/weights", lr)
                    tf.summary.scalar("lr/bits", lr_bits)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
        bar.close()
        return sum(losses) / len(losses) if losses else None

    def _check_replicas_agree(self, step: int) -> None:
        """Every local replica holds the same ``bits_scale`` (and so the same bits) after a
        step that trained them; a difference means the replicas no longer train one model."""
        if not distribution.is_distributed(self.strategy):
            return
        for var in self.bits_vars:
            copies = [c.numpy() for c in self.strategy.experimental_local_results(var)]
            if any(not np.array_equal(copies[0], c) for c in copies[1:]):
                raise self._diverged(f"the replicas' copies of {var.name} differ after step "
                                     f"{step} (the strategy's all-reduce failed)")

    # ------------------------------------------------------------------ validation

    def _reported_bits(self):
        """``(BitAssignment, {quantizer: bits} or None)``: the model's current bits for the
        reports (validation, summaries), a quantized model's read in one traced call."""
        if not is_quantized(self.model):
            return cost_lib.bits_of(self.model), None
        if self._read_bits is None:
            self._read_bits = self.model.bits_reader()
        values = self._read_bits()
        return self.model.assignment_of(values), values

    def validate(self) -> dict:
        acc = validation.accuracy(self.model, self.val_data, progress=self.o.progress,
                                  max_images=self.o.max_val_images, step=self._eval_step)
        # The counts depend on the bits and densities alone, which most mini-epochs leave
        # as they were (fixed bits, bits trained every other mini-epoch): count them once.
        bits = self._reported_bits()[0]
        key = bits.fingerprint()
        if self._cost is None or self._cost[0] != key:
            self._cost = (key, cost_lib.cost_report(bits, self.metric_img_size,
                                                    arch=self.model.arch))
        report = self._cost[1]
        return {"top1": acc["top1"], "top5": acc["top5"], **report.as_dict(),
                "metric": report.score(self.o.metric_style)}

    # ------------------------------------------------------------------ summaries

    def _summaries(self, result: dict, mini_epoch: int) -> None:
        if not self.chief:
            return
        with self.writer.as_default(step=mini_epoch):
            for key in ("top1", "top5", "score_adjq", "score_micronet", "params", "ops",
                        "avg_weight_bits", "avg_act_bits", "metric"):
                tf.summary.scalar(f"val/{key}", result[key])
            bits, values = self._reported_bits()
            for name, hist in validation.bits_histograms(self.model, values).items():
                tf.summary.histogram(name, hist)
            if is_quantized(self.model):
                for scope, density in bits.density.items():
                    tf.summary.scalar(f"sparsity/{scope}", 1.0 - tf.reduce_mean(density))
                tf.summary.image("bits/per_layer", self._bits_plot(bits)[None], step=mini_epoch)
        self.writer.flush()

    def _bits_plot(self, bits) -> np.ndarray:
        """The per-layer bits plot (RGBA pixels), drawn again only when what it shows
        changed (the step is TensorBoard's, not in the title)."""
        scopes = self.model.arch.layer_names
        shown = (layer_average_bits(bits, scopes), layer_sparsity(bits, scopes)
                 if bits.density else None)
        if self._bits_png is None or self._bits_png[0] != shown:
            if self._plot is None:
                self._plot = BitsPlot(scopes, bool(bits.density),
                                      f"{self.stage}: average bits per layer")
            self._bits_png = (shown, self._plot.rgba(bits))
        return self._bits_png[1]

    def _write_hparams(self) -> None:
        from tensorboard.plugins.hparams import api as hp

        if not self.chief:
            return
        values = {k: v for k, v in dataclasses.asdict(self.o).items()
                  if isinstance(v, (bool, int, float, str)) and k not in ("progress",)}
        values["stage"] = self.stage
        with self.writer.as_default():
            hp.hparams(values)

