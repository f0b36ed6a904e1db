"""Flags and config files for ``train.py`` and ``eval.py``.

Precedence, lowest first: built-in defaults, the config file's top level, the config
file's table for the stage being run (``[pretrain]``, ``[qat8]``, ...), then the flags
given on the command line. Flag names are those of the original Adjustable Quantization
commands (docs/method.md, "Flags"); ``--alpha``, ``--beta`` and ``--gamma`` are loss weights.

Every option is declared once, in :data:`SCHEMA` (type, default, choices, help, docs row,
defaults per place, how it behaves on resume, whether evaluation takes it from the trained
run); the :class:`Options` dataclass, the argparse flags, the TOML checks, the resume rules
and the flags table of docs/method.md (:func:`flags_table`) are derived from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
import tomllib
from typing import Any

from adj_quant.errors import UserError
from adj_quant.files import write_json_atomic

STAGES = ("pretrain", "calibrate", "qat8", "adjustable", "finetune")


def _default_config() -> str:
    """``configs/digits.toml``: packaged as ``adj_quant/configs`` when installed, the
    checkout's ``configs/`` otherwise."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # adj_quant/
    installed = os.path.join(package, "configs", "digits.toml")
    return installed if os.path.exists(installed) else os.path.join(
        os.path.dirname(package), "configs", "digits.toml")


DEFAULT_CONFIG = _default_config()


# --------------------------------------------------------------------------- the schema

#: How an option behaves when an interrupted stage resumes: ``arch_data`` options define
#: the model or the data (its checkpoints hold another model, or another data split: a
#: change is always refused); ``compared`` ones change what a stage trains (a change needs
#: ``--allow_config_change`` and is recorded); ``uncompared`` ones only say where or how
#: visibly it runs.
RESUME_KINDS = ("arch_data", "compared", "uncompared")
#: Where a stage-dependent default applies (``Opt.place_defaults``): float pretraining, the
#: quantized stages (calibrate .. finetune), and evaluation/export (no stage).
PLACES = ("pretrain", "quantized", "eval")
#: Sections of the flags table in docs/method.md, in order.
GROUPS = ("Data", "Model", "Quantization", "Loss", "Optimisation", "Pruning", "Devices",
          "Files and runs")


@dataclasses.dataclass(frozen=True)
class LazyChoices:
    """The choices of an option, read from the module that owns them (imported on first
    use: the quantizer modules load TensorFlow): a tuple, or a function returning one."""

    module: str
    name: str

    def resolve(self) -> tuple:
        value = getattr(importlib.import_module(self.module), self.name)
        return tuple(value() if callable(value) else value)  # a registry's names()


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option, declared once: its flag ``--name``, its TOML key and its field of
    :class:`Options`, and everything derived from them."""

    name: str
    type: type  # bool, int, float or str; a default of None makes it optional
    default: Any
    help: str
    group: str
    choices: tuple | LazyChoices | None = None
    #: ``non_negative`` or ``positive`` (None: no sign rule).
    sign: str | None = None
    resume: str = "compared"  # one of RESUME_KINDS
    #: Evaluation and export take it from the ``config.json`` of the run that trained a
    #: checkpoint unless given on the command line.
    trained_with: bool = False
    #: Defaults per place (PLACES) used when the value is still None after the config file
    #: and the command line.
    place_defaults: dict = dataclasses.field(default_factory=dict)
    doc: str | None = None  # meaning in docs/method.md's flags table (default: help)
    doc_default: str | None = None  # default column of that table (default: the value)

    @property
    def optional(self) -> bool:
        return self.default is None

    def resolved_choices(self) -> tuple | None:
        if isinstance(self.choices, LazyChoices):
            return self.choices.resolve()
        return self.choices


def _o(name, kind, default, help, group, **kw) -> Opt:  # noqa: A002 (the schema's own word)
    return Opt(name, kind, default, help, group, **kw)


_AD, _UN = "arch_data", "uncompared"
SCHEMA: tuple[Opt, ...] = (
    # --- data
    _o("dataset", str, "digits",
       "'digits' (embedded default), 'synthetic', or a directory of slim ImageNet "
       "TFRecord shards (train-*-of-*, validation-*-of-*)", "Data", resume=_AD,
       trained_with=True,
       doc="`digits` (bundled with scikit-learn), `synthetic`, or a directory of slim ImageNet "
           "TFRecords"),
    _o("img_size", int, 224, "input image size (square)", "Data", sign="positive", resume=_AD,
       trained_with=True, doc="input side in pixels"),
    _o("num_classes", int, None, "number of classes (default: the dataset's)", "Data",
       sign="positive", resume=_AD, trained_with=True, doc="classes of the logits layer",
       doc_default="the dataset's"),
    _o("labels_offset", int, 0,
       "subtracted from TFRecord labels (1 for the slim 1001-class convention)", "Data",
       sign="non_negative", resume=_AD, trained_with=True,
       doc="subtracted from TFRecord labels (1 for 1001-class shards)"),
    _o("batch_size", int, 25, "images per training batch", "Data", sign="positive",
       trained_with=True, doc="images per training step"),
    _o("seed", int, 0, "random seed for initialisation, shuffling, augmentation and dropout",
       "Data", sign="non_negative", trained_with=True,
       doc="initialisation, shuffling, augmentation, dropout"),
    _o("max_val_images", int, None,
       "validate on at most this many images (default: the whole split)", "Data",
       sign="positive", doc="validate on at most this many images", doc_default="all"),
    _o("augment", str, None,
       "training augmentation: inception (random 8-100% crop + flip), shift (small "
       "random translation) or none (default: the dataset's own for pretrain -- "
       "shift for digits, inception for TFRecords -- and none for the quantized stages)",
       "Data", choices=LazyChoices("adj_quant.recipe.data", "AUGMENTATIONS"),
       place_defaults={"quantized": "none"},
       doc="`inception`, `shift` or `none`; see [What is quantized](#what-is-quantized)",
       doc_default="per stage"),
    _o("eval_crop", float, 0.875,
       "fraction of the shorter side kept by the central crop of TFRecord images "
       "(1.0: no crop)", "Data", resume=_AD, trained_with=True,
       doc="central-crop fraction of TFRecord images (1.0: no crop)"),
    # --- model
    _o("model", str, "efficientnet_b0",
       "the network: a declared name (efficientnet_b0, mobilenet_v2, mobilenet_v2_140, "
       "resnet_v1_50, resnet_v1_50_keras, ...) or keras:PATH, a float Keras model file "
       "(.keras) imported with its weights", "Model", resume=_AD, trained_with=True,
       doc="a declared network ([networks.md](networks.md)) or `keras:PATH`"),
    _o("pretrained", str, None,
       "start from public float weights: a Keras applications weights file, an "
       "official TPU EfficientNet checkpoint or a slim checkpoint (converted into "
       "the run, see pretrained/README.md); the recipe then starts at calibrate", "Model",
       doc="public float weights converted into the run's `pretrain` stage",
       doc_default="none"),
    _o("width_multiplier", float, 1.0,
       "channel multiplier of the network (slim's MobileNet 'depth "
       "multiplier'); 1.0 is the published network", "Model", resume=_AD, trained_with=True,
       doc="channel multiplier (1.0: the published network)"),
    _o("depth_multiplier", float, 1.0,
       "multiplier of the blocks per stage (1.0 is the published network)", "Model",
       resume=_AD, trained_with=True, doc="blocks per stage multiplier (B0 = 1)"),
    _o("dropout", float, None,
       "dropout before the logits (default: 0.2 in pretrain, 0 in the quantized stages)",
       "Model", place_defaults={"pretrain": 0.2, "quantized": 0.0, "eval": 0.0},
       doc="dropout before the logits", doc_default="0.2 in `pretrain`, else 0"),
    _o("drop_connect", float, None,
       "maximum drop-connect rate of the residual branches (default: 0.2 in "
       "pretrain, 0 in the quantized stages)", "Model",
       place_defaults={"pretrain": 0.2, "quantized": 0.0, "eval": 0.0},
       doc="maximum drop-connect rate of the residual branches",
       doc_default="0.2 in `pretrain`, else 0"),
    _o("bn_momentum", float, 0.99,
       "momentum of the batch-norm moving averages (float pretraining)", "Model",
       doc="batch-norm moving averages (float pretraining)"),
    # --- quantization
    _o("weight_bits", int, 8, "initial weight bits b0 (2..8)", "Quantization", resume=_AD,
       trained_with=True, doc="initial weight bits `b0` (2–8)"),
    _o("act_bits", int, 8, "initial activation bits b0 (2..8)", "Quantization", resume=_AD,
       trained_with=True, doc="initial layer-input bits `b0` (2–8)"),
    _o("swish_bits", int, 8,
       "swish inputs: 8 = fixed 8 bits, 0 = trainable bits from --act_bits, -1 = float",
       "Quantization", resume=_AD, trained_with=True,
       doc="swish and SE-gate inputs: 8 fixed, 0 trainable from `--act_bits`, −1 float"),
    _o("bias_bits", int, 8, "bias bits (2..8); 0 keeps biases float", "Quantization",
       resume=_AD, trained_with=True, doc="bias bits (2–8); 0 keeps biases float"),
    _o("bits_trainable", bool, False, "learn per-channel bit-widths (bits_scale)",
       "Quantization", resume=_AD, doc="learn per-channel bits (`bits_scale`)"),
    _o("range", int, 5, "range preset 1..7: clip intervals of range_scale and range_shift",
       "Quantization", resume=_AD, trained_with=True, doc="range preset 1–7"),
    _o("bits_grad", str, "original",
       "estimator of the bits: original (the upper clip bound 2^b-1 passes gradient "
       "to the bits, as the original ran) or scale_only (only through the scale)",
       "Quantization", choices=LazyChoices("adj_quant.quantizers.formula", "BITS_GRAD_MODES"),
       doc="estimator of the bits: `original` or `scale_only`"),
    _o("bias_range", str, "live",
       "bias quantizer range: live (the bias tensor's own min/max at every step, "
       "as the original) or calibrated (fixed at calibration)", "Quantization",
       choices=LazyChoices("adj_quant.qnetwork", "BIAS_RANGES"), resume=_AD, trained_with=True,
       doc="bias base range: `live` or `calibrated`"),
    _o("quantize_se_gate", bool, True,
       "quantize the input of the SE gate's sigmoid like a swish input", "Quantization",
       resume=_AD, trained_with=True, doc="quantize the SE sigmoid's input like a swish input"),
    _o("quantizer", str, "adjq",
       "the fake quantizer: adjq (adjustable ranges and bits, the method) or lsq "
       "(LSQ+: a learned per-channel step, and offset for activations, at the fixed "
       "--weight_bits/--act_bits; a baseline, see docs/baselines.md)", "Quantization",
       choices=LazyChoices("adj_quant.quantizers", "names"), resume=_AD, trained_with=True,
       doc="`adjq` (this method) or `lsq`: LSQ+ at fixed bits, a baseline "
           "([`baselines.md`](baselines.md))"),
    _o("symmetric_weights", bool, False,
       "put every weight channel on a symmetric grid with zero point 0: "
       "clip(round(x s), -n, n) / s, n = 2^(b-1) - 1 (2^b - 1 levels; at 2 bits ternary), so "
       "that weight channels of <= 4 bits export as INT4 (activations and biases unchanged; "
       "--quantizer adjq only; no new variables: a stage may start from an asymmetric "
       "checkpoint)", "Quantization",
       doc="symmetric weight grids, zero point 0, `2^b − 1` levels: ≤ 4-bit conv/depthwise "
           "channels export as INT4 ([symmetric grids](#symmetric-weight-grids))"),
    _o("calib_images", int, 10000, "training images used to calibrate activation ranges",
       "Quantization", sign="positive", trained_with=True,
       doc="training images used for calibration"),
    _o("eval_initial_thresholds", bool, False,
       "also validate the quantized model with the initial thresholds", "Quantization",
       doc="also validate with the initial thresholds after calibration"),
    # --- loss (the flags keep the original names; inside: ce_weight, metric_weight, act_share)
    _o("alpha", float, 7.0, "loss weight of the cross-entropy", "Loss", sign="non_negative",
       doc="weight of the cross-entropy"),
    _o("beta", float, 85.0, "loss weight of the metric term", "Loss", sign="non_negative",
       doc="weight of the metric term"),
    _o("gamma", float, 0.7,
       "share of the metric gradient that goes to activation bits (1-gamma to weights)", "Loss",
       doc="share of a max's metric gradient sent to the activation bits"),
    _o("metric", float, 0.18,
       "target score: the metric term pushes down above it and up below it", "Loss",
       sign="non_negative", doc="target score"),
    _o("metric_style", str, "adjq",
       "counting used in the loss: adjq (the submission's) or micronet (official)", "Loss",
       choices=LazyChoices("adj_quant.cost", "STYLES"),
       doc="counting in the loss: `adjq` or `micronet`"),
    _o("metric_img_size", int, None,
       "image size at which the metric is counted (default: --img_size)", "Loss",
       sign="positive", trained_with=True, doc="resolution at which the metric is counted",
       doc_default="`--img_size`"),
    # --- optimisation
    _o("lr", float, 3e-6, "Adam learning rate of weights, biases, range_scale and range_shift",
       "Optimisation", sign="non_negative",
       doc="Adam rate of weights, biases, `range_scale`, `range_shift`", doc_default="3e-6"),
    _o("lr_bits", float, 1e-3, "Adam learning rate of bits_scale", "Optimisation",
       sign="non_negative", doc="Adam rate of `bits_scale` (constant)", doc_default="1e-3"),
    _o("lr_fixed", bool, False, "keep the learning rates constant", "Optimisation",
       doc="constant `--lr`, no slot re-initialisation"),
    _o("lr_decay", float, 1e-4, "exponential decay per step of the learning rate",
       "Optimisation", sign="non_negative", doc="exponential decay per step",
       doc_default="1e-4"),
    _o("reinit", int, 800, "re-initialise the Adam slots and restart the cosine every N steps",
       "Optimisation", sign="positive",
       doc="period in steps of the cosine and of the Adam re-initialisation"),
    _o("max_epoch", float, 2.0,
       "epochs to train; fractional values stop after whole mini-epochs (0.3 = 3)",
       "Optimisation", sign="positive", doc="epochs, in steps of 0.1"),
    _o("iter_train", bool, False,
       "iterative training: train bits only in mini-epochs k % iter_train_freq == 0",
       "Optimisation",
       doc="train the bits only in mini-epochs with `k mod iter_train_freq = 0`"),
    _o("iter_train_freq", int, 2, "period (in mini-epochs) of the bit phases of --iter_train",
       "Optimisation", sign="positive", doc="period of the bit phases, in mini-epochs"),
    _o("warm_up_epoch", float, 0.0, "epochs before bits start training", "Optimisation",
       sign="non_negative", doc="epochs before the bits start training"),
    _o("finetune", bool, False, "freeze the bits (train everything except bits_scale)",
       "Optimisation", doc="freeze the bits"),
    _o("swa_delay", float, None,
       "start stochastic weight averaging after this many epochs (unset: no SWA)",
       "Optimisation", sign="non_negative", doc="epoch from which SWA snapshots are taken",
       doc_default="unset (no SWA)"),
    _o("swa_freq", float, 0.2, "SWA snapshot period in epochs (multiples of 0.1)",
       "Optimisation", sign="positive",
       doc="SWA snapshot period in epochs (a multiple of 0.1)"),
    _o("jit_compile", bool, False, "compile the training step with XLA", "Optimisation"),
    # --- pruning
    _o("sparsity", float, 0.0,
       "fraction of every weight tensor set to zero by gradual magnitude pruning in this "
       "stage, in [0, 1) (0: no pruning; masks a stage starts with are kept; the quantized "
       "stages only, frozen in finetune)", "Pruning", sign="non_negative", resume=_AD,
       doc="fraction of zero weights reached by gradual magnitude pruning (quantized stages)"),
    _o("learned_sparsity", bool, False,
       "learn each pointwise/FC weight tensor's sparsity: a trainable magnitude threshold per "
       "tensor, trained with the bits by the metric term (not with --sparsity; quantized "
       "stages only, frozen in finetune)", "Pruning", resume=_AD,
       doc="learn each tensor's magnitude threshold with the metric term (docs/method.md)"),
    _o("prune_start", float, 0.0,
       "when pruning starts, as a fraction of the stage's steps", "Pruning",
       sign="non_negative", doc="start of the pruning schedule (fraction of the stage)"),
    _o("prune_end", float, 0.75,
       "when --sparsity is reached, as a fraction of the stage's steps (at most 1)",
       "Pruning", sign="positive", doc="end of the pruning schedule (fraction of the stage)"),
    _o("prune_every", int, 5, "steps between two mask updates", "Pruning", sign="positive",
       doc="steps between mask updates"),
    _o("prune_scope", str, "layer",
       "layer: every weight tensor reaches --sparsity; global: one magnitude threshold over "
       "all of them", "Pruning", choices=("layer", "global"),
       doc="`layer` (each tensor) or `global` (one threshold)"),
    # --- devices
    _o("strategy", str, "auto",
       "where to train (tf.distribute): auto (mirrored over all GPUs when there is "
       "more than one, else one device), default (one device), mirrored (all local "
       "GPUs, else all logical CPUs), multi_worker (one process per host, from "
       "TF_CONFIG) or tpu (see docs/distributed.md); --batch_size is the global batch",
       "Devices", choices=LazyChoices("adj_quant.distribution", "STRATEGIES"), resume=_UN,
       doc="`tf.distribute` strategy: `auto`, `default`, `mirrored`, `multi_worker` or `tpu` "
           "([distributed.md](distributed.md)); `--batch_size` is the global batch"),
    _o("logical_cpus", int, 1,
       "split the CPU into this many logical devices (try mirrored on a machine "
       "without GPUs; it tests the plumbing, it is not faster)", "Devices", sign="positive",
       resume=_UN, doc="split the CPU into this many logical devices"),
    _o("worker_timeout", float, 300.0,
       "seconds a multi_worker start waits for every worker of TF_CONFIG, and how long a "
       "worker may go unanswered mid-run before the others stop", "Devices",
       sign="positive", resume=_UN,
       doc="seconds a `multi_worker` start waits for every worker, and a silent one mid-run"),
    _o("sync_bn", bool, False,
       "batch norm with the statistics of the global batch, summed over all replicas "
       "(float pretraining under a multi-replica strategy)", "Devices",
       doc="batch norm over the global batch (float pretraining, several replicas)"),
    _o("keep_checkpoints", int, 3,
       "keep the best and this many most recent checkpoints (0: keep all)", "Files and runs",
       sign="non_negative", doc="keep the best and this many latest checkpoints (0: all)"),
    _o("max_loss", float, None,
       "stop when a training loss exceeds this (default: 1e6 x the stage's first "
       "mini-epoch mean loss)", "Optimisation", sign="positive",
       doc="a training loss above it stops the run (divergence)",
       doc_default="1e6 × the first mini-epoch's mean loss"),
    _o("collapse_patience", int, 3,
       "stop when validation top-1, after being above chance, stays at chance "
       "level for this many mini-epochs (0: never)", "Optimisation", sign="non_negative",
       doc="stop when top-1, once above chance, stays at chance (≤ 1.5/classes) this many "
           "mini-epochs; 0: never"),
    # --- files
    _o("ckpt_path", str, None,
       "initialise from this checkpoint (a prefix, or a directory: its best one)",
       "Files and runs", doc="checkpoint (prefix or directory) to start from",
       doc_default="the previous stage's best"),
    _o("teacher_ckpt", str, None,
       "float teacher checkpoint for distillation (default: the run's pretrain)",
       "Files and runs", doc="float teacher for distillation",
       doc_default="the run's `pretrain`, else that of `--ckpt_path`'s run"),
    _o("run_dir", str, None,
       "run directory holding every stage's output (default: runs/<dataset>)",
       "Files and runs", resume=_UN, doc="directory of all stages",
       doc_default="`runs/<dataset>`"),
    _o("stage", str, None,
       "run one stage: " + ", ".join(STAGES) + " (default: the whole recipe)",
       "Files and runs", choices=STAGES, resume=_UN,
       doc="`pretrain`, `calibrate`, `qat8`, `adjustable` or `finetune`", doc_default="all"),
    _o("config", str, None,
       "TOML config file (default for the digits recipe: configs/digits.toml)",
       "Files and runs", resume=_UN, doc="TOML config file",
       doc_default="`configs/digits.toml` for digits"),
    _o("progress", bool, True,
       "show progress bars on a terminal (off a terminal, e.g. in a log file, one "
       "plain line per mini-epoch is printed instead)", "Files and runs", resume=_UN,
       doc="progress bars, on a terminal only (a log file gets one line per mini-epoch)"),
    _o("allow_config_change", bool, False,
       "resume an interrupted stage with changed training flags (recorded "
       "in config_history.json); architecture and data changes are always "
       "refused", "Files and runs", resume=_UN,
       doc="resume a stage with other training flags, recorded in `config_history.json` "
           "(model and data changes are always refused)"),
)

FIELDS: dict[str, Opt] = {opt.name: opt for opt in SCHEMA}
assert len(FIELDS) == len(SCHEMA), "an option is declared twice"
assert all(o.resume in RESUME_KINDS and o.group in GROUPS for o in SCHEMA)
assert all(set(o.place_defaults) <= set(PLACES) for o in SCHEMA)


class _OptionsMethods:
    """What :class:`Options` adds to its fields (the fields come from :data:`SCHEMA`)."""

    @property
    def swish_mode(self):
        """``--swish_bits`` as a :class:`adj_quant.qnetwork.SwishMode`."""
        from adj_quant.qnetwork import SwishMode

        return SwishMode.from_flag(self.swish_bits)

    @property
    def quantized_bias_bits(self) -> int | None:
        """``--bias_bits``, None for float biases (the flag's 0)."""
        return self.bias_bits or None

    @property
    def metric_size(self) -> int:
        """The image size at which the metric is counted."""
        return self.metric_img_size or self.img_size


def _field_type(opt: Opt):
    return opt.type | None if opt.optional else opt.type


#: The resolved options of a stage: one field per :data:`SCHEMA` entry, same name, same
#: default (flag-level values: ``swish_bits`` 8/0/-1, ``bias_bits`` 0 for float biases;
#: :attr:`swish_mode` and :attr:`quantized_bias_bits` give their meaning).
Options = dataclasses.make_dataclass(
    "Options", [(o.name, _field_type(o), dataclasses.field(default=o.default)) for o in SCHEMA],
    bases=(_OptionsMethods,))
Options.__module__ = __name__


def _names(predicate) -> tuple[str, ...]:
    return tuple(o.name for o in SCHEMA if predicate(o))


#: Options that describe the data and the model, which evaluation and export take from the
#: run that trained a checkpoint (its ``config.json``) unless given on the command line.
TRAINED_FIELDS = _names(lambda o: o.trained_with)
#: Options that define the model or the data of a stage: an interrupted stage never
#: resumes with other values (its checkpoints hold another model, or another data split).
ARCH_DATA_FIELDS = _names(lambda o: o.resume == "arch_data")
#: Not compared when a stage resumes: where it runs does not change what it trains.
UNCOMPARED_FIELDS = _names(lambda o: o.resume == "uncompared")
#: Numbers that must not be negative (learning rates, loss weights, epochs, counts).
NON_NEGATIVE = _names(lambda o: o.sign == "non_negative")
POSITIVE = _names(lambda o: o.sign == "positive")
#: Defaults that depend on the stage: float pretraining regularises, the quantized stages
#: (and evaluation, stage None) run the network as the original did, without.
PRETRAIN_ONLY = {o.name: o.place_defaults["pretrain"] for o in SCHEMA
                 if "pretrain" in o.place_defaults}


def place_of(stage: str | None) -> str:
    """The PLACES entry of a stage (None: evaluation or export)."""
    return "eval" if stage is None else "pretrain" if stage == "pretrain" else "quantized"


def choices_of(name: str) -> tuple | None:
    return FIELDS[name].resolved_choices()


class _Parser(argparse.ArgumentParser):
    #: ``--lr -1e-3`` and ``--seed -1`` are values, not options: argparse's own pattern
    #: misses exponents and ``-inf`` (the values are then refused by :func:`validate`).
    NEGATIVE_NUMBER = re.compile(
        r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def error(self, message):  # one line, no usage dump
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Flag help reflowed; the description (the command's docstring, with its example
    commands) kept as written."""


def _add_flag(parser: argparse.ArgumentParser, opt: Opt) -> None:
    text = opt.help.replace("%", "%%")  # argparse %-formats help texts
    if opt.default is not None or "default:" not in text:
        text += f" (default: {opt.default})"
    choices = opt.resolved_choices()
    if opt.type is bool:
        parser.add_argument(f"--{opt.name}", action=argparse.BooleanOptionalAction, help=text)
    elif choices is not None:
        parser.add_argument(f"--{opt.name}", type=opt.type, choices=choices, help=text)
    else:
        parser.add_argument(f"--{opt.name}", type=opt.type, metavar=opt.name.upper(), help=text)


def build_parser(prog: str, description: str, extra: dict[str, dict] | None = None,
                 fields: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter,
                     argument_default=argparse.SUPPRESS)
    for name in fields or FIELDS:
        _add_flag(parser, FIELDS[name])
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    return parser


# --------------------------------------------------------------------------- docs table


def _doc_default(opt: Opt) -> str:
    if opt.doc_default is not None:
        return opt.doc_default
    if opt.type is bool:
        return "on" if opt.default else "off"
    if opt.type is str:
        return f"`{opt.default}`"
    return str(opt.default)


def flags_table() -> str:
    """The "Flags" tables of docs/method.md, one per group (tests/test_config.py checks
    that the docs hold exactly this)."""
    parts = []
    for group in GROUPS:
        rows = [f"| `--{o.name}` | {_doc_default(o)} | {o.doc or o.help} |"
                for o in SCHEMA if o.group == group]
        parts.append("\n".join([f"**{group}**", "", "| flag | default | meaning |",
                                "| --- | --- | --- |", *rows]))
    return "\n\n".join(parts) + "\n"


def _check_keys(table: dict, where: str) -> None:
    for key, value in table.items():
        if key in STAGES and isinstance(value, dict):
            continue
        if key not in FIELDS or key in ("config", "stage"):
            raise UserError(f"unknown config key {key!r} in {where}; known keys: "
                            "see `python train.py --help`")


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass --config FILE.toml") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass --config FILE.toml") from None
    except OSError as err:
        raise UserError(f"config file {path} cannot be read ({err.strerror}); pass a readable "
                        "--config FILE.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); pass a TOML file "
                        "such as configs/digits.toml") from None
    _check_keys(data, path)
    for stage in STAGES:
        if stage in data:
            _check_keys(data[stage], f"{path} [{stage}]")
            for key, value in data[stage].items():
                if isinstance(value, dict):
                    raise UserError(f"{path} [{stage}]: nested stage table {key!r} is not allowed")
    return data


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = FIELDS[name].type
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{where}: {name} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: {name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise UserError(f"{where}: {name} must be a string, got {value!r}")
    return value


def resolve(cli: dict[str, Any], stage: str | None) -> Options:
    """Options for ``stage`` from defaults, the config file and the command line."""
    config_path = cli.get("config")
    if config_path is None and cli.get("dataset", "digits") == "digits":
        config_path = DEFAULT_CONFIG
    values: dict[str, Any] = {}
    if config_path:
        data = load_config(config_path)
        for key, value in data.items():
            if not (key in STAGES and isinstance(value, dict)):
                values[key] = _coerce(key, value, config_path)
        if stage and isinstance(data.get(stage), dict):
            for key, value in data[stage].items():
                values[key] = _coerce(key, value, f"{config_path} [{stage}]")
    values.update(cli)
    values["config"] = config_path
    place = place_of(stage)  # augment in pretrain: the dataset's own (data.default_augment)
    for opt in SCHEMA:
        if place in opt.place_defaults and values.get(opt.name) is None:
            values[opt.name] = opt.place_defaults[place]
    # Progress bars on a terminal only: in a log file their frames become endless lines
    # (the trainer prints one plain line per mini-epoch either way).
    values["progress"] = bool(values.get("progress", True)) and _stderr_is_terminal()
    options = Options(**values)
    validate(options)
    if stage in ("pretrain", "finetune") and (options.sparsity > 0 or
                                               options.learned_sparsity):
        flag = f"--sparsity {options.sparsity}" if options.sparsity > 0 else \
            "--learned_sparsity"
        why = "its masks are frozen" if stage == "finetune" else "pruning runs in the " \
            "quantized stages"
        raise UserError(f"{flag} in the {stage} stage: {why}; set it in the [qat8] and "
                        "[adjustable] tables (or pass it with --stage qat8 or adjustable)")
    return options


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


FLOAT32_MAX = 3.4028234663852886e38
MAX_EPOCHS, MAX_MULTIPLIER, MAX_IMG_SIZE = 1e6, 16.0, 4096


def validate(o: Options) -> None:
    """Refuse impossible values with one line each, before anything is written."""
    _check_numbers(o)
    _check_sizes(o)
    _check_choices(o)
    _check_quantization(o)


def _check_numbers(o: Options) -> None:
    """Finite float32 numbers, the schema's sign rules, and the fractions."""
    for opt in SCHEMA:
        value = getattr(o, opt.name)
        if opt.type is float and value is not None and not math.isfinite(value):
            raise UserError(f"--{opt.name} {value} is not a finite number; pass a finite value")
        if opt.type is float and value is not None and abs(value) > FLOAT32_MAX:
            raise UserError(f"--{opt.name} {value} is beyond float32's range (the training runs "
                            "in float32); pass a smaller value")
    for name in NON_NEGATIVE:
        value = getattr(o, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} {value} must not be negative")
    if not 0.0 <= o.gamma <= 1.0:
        raise UserError(f"--gamma {o.gamma} is a share of the metric gradient; pass a value "
                        "in [0, 1]")
    if not 0.0 <= o.bn_momentum < 1.0:
        raise UserError(f"--bn_momentum {o.bn_momentum} must be in [0, 1)")
    for name in POSITIVE:
        if getattr(o, name) is not None and getattr(o, name) <= 0:
            raise UserError(f"--{name} {getattr(o, name)} must be positive")


def _check_sizes(o: Options) -> None:
    """The model, its multipliers, the image size and the epochs."""
    check_model(o.model)
    if o.width_multiplier <= 0 or o.depth_multiplier <= 0:
        raise UserError("--width_multiplier and --depth_multiplier must be positive")
    for name in ("max_epoch", "swa_freq", "swa_delay", "warm_up_epoch"):
        if (getattr(o, name) or 0) > MAX_EPOCHS:
            raise UserError(f"--{name} {getattr(o, name)} epochs is more than {MAX_EPOCHS:g}; "
                            "pass a number of epochs")
    for name in ("width_multiplier", "depth_multiplier"):
        if getattr(o, name) > MAX_MULTIPLIER:
            raise UserError(f"--{name} {getattr(o, name)} is larger than {MAX_MULTIPLIER:g}; "
                            "pass a multiplier such as 1.0")
    if o.img_size > MAX_IMG_SIZE:
        raise UserError(f"--img_size {o.img_size} is larger than {MAX_IMG_SIZE}; pass an image "
                        "size such as 224")
    if round(o.max_epoch * 10, 6) != round(o.max_epoch * 10):
        raise UserError(f"--max_epoch {o.max_epoch} must be a multiple of 0.1 (one mini-epoch)")
    if round(o.swa_freq * 10) < 1:
        raise UserError(f"--swa_freq {o.swa_freq} must be at least 0.1 (one mini-epoch)")


def _check_choices(o: Options) -> None:
    """The schema's choices, and the fractions (dropout rates, crop)."""
    for opt in SCHEMA:
        value, choices = getattr(o, opt.name), opt.resolved_choices()
        if choices is not None and value is not None and value not in choices:
            raise UserError(f"--{opt.name} {value!r}: use one of {', '.join(choices)}")
    for name in ("dropout", "drop_connect"):
        value = getattr(o, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"--{name} {value} must be in [0, 1)")
    if not 0.0 < o.eval_crop <= 1.0:
        raise UserError(f"--eval_crop {o.eval_crop} must be a fraction in (0, 1]; 1.0 keeps "
                        "the whole image")


def _check_quantization(o: Options) -> None:
    """Bit-widths, the swish mode, the range preset and the quantizer's own rules."""
    from adj_quant.bits import is_bit_width
    from adj_quant.qnetwork import QuantConfig, SwishMode
    from adj_quant.quantizers.formula import RANGE_PRESETS, range_preset

    for name in ("weight_bits", "act_bits"):
        if not is_bit_width(getattr(o, name)):
            raise UserError(f"--{name} {getattr(o, name)} is outside [2, 8]; pass a bit-width "
                            "from 2 to 8")
    if o.bias_bits != 0 and not is_bit_width(o.bias_bits):
        raise UserError(f"--bias_bits {o.bias_bits}: use 2..8, or 0 for float biases")
    if o.swish_bits not in SwishMode.flags():
        raise UserError(f"--swish_bits {o.swish_bits} is not a swish mode; use 8 (fixed 8 bits), "
                        "0 (trainable bits from --act_bits) or -1 (not quantized)")
    try:
        range_preset(o.range)
    except UserError:
        raise UserError(f"--range {o.range} is not a preset; choose one of "
                        f"{', '.join(map(str, RANGE_PRESETS))}") from None
    if o.quantizer == "lsq" and o.bits_trainable:
        raise UserError("--quantizer lsq runs at fixed bits and cannot take --bits_trainable; "
                        "drop --bits_trainable (pass --no-bits_trainable where a config file "
                        "sets it, e.g. the [adjustable] table), or use --quantizer adjq")
    if o.quantizer != "adjq" and o.symmetric_weights:
        raise UserError(f"--symmetric_weights with --quantizer {o.quantizer}: the symmetric "
                        "grid is the adjustable quantizer's; drop --symmetric_weights (pass "
                        "--no-symmetric_weights where a config file sets it), or use "
                        "--quantizer adjq")
    QuantConfig.from_options(o)
    _check_pruning(o)


def _check_pruning(o: Options) -> None:
    from adj_quant.sparsity import check_sparsity

    check_sparsity(o.sparsity, "--sparsity")
    if o.learned_sparsity and o.sparsity > 0:
        raise UserError(f"--learned_sparsity with --sparsity {o.sparsity}: the metric term "
                        "sets each tensor's sparsity when it is learned; drop one of them "
                        "(--sparsity 0, or --no-learned_sparsity)")
    if not 0.0 <= o.prune_start < o.prune_end:
        raise UserError(f"--prune_start {o.prune_start} must be below --prune_end "
                        f"{o.prune_end}; both are fractions of the stage's steps")
    if o.prune_end > 1.0:
        raise UserError(f"--prune_end {o.prune_end} ends the schedule after its stage does; "
                        "pass a fraction of the stage's steps up to 1")


def check_model(model: str) -> None:
    """A declared network name, or ``keras:PATH`` of an existing file."""
    from adj_quant import nets

    if model.startswith("keras:"):
        path = model[len("keras:"):]
        if not os.path.isfile(path):
            raise UserError(f"--model {model}: no Keras model file {path!r}; pass keras:PATH "
                            "of a saved .keras model")
    elif model not in nets.names():
        raise UserError(f"--model {model!r} is not a known network; known networks: "
                        f"{', '.join(nets.names())} (or keras:PATH)")


def trained_config(ckpt_path: str) -> dict:
    """The data/model options a checkpoint was trained with (``config.json`` beside it)."""
    path = os.path.join(os.path.dirname(ckpt_path), "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); pass the data flags yourself") from None
    return {k: v for k, v in saved.items() if k in TRAINED_FIELDS}


def options_to_json(o: Options) -> dict:
    return dataclasses.asdict(o)


def save_resolved(o: Options, path: str) -> None:
    write_json_atomic(path, options_to_json(o), sort_keys=True)


# --------------------------------------------------------------------------- resuming

CONFIG_FILE, CONFIG_HISTORY = "config.json", "config_history.json"


def config_changes(saved: dict, o: Options) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every compared option that differs (keys a
    config.json of an older version lacks are not changes)."""
    new = options_to_json(o)
    return {k: (saved[k], new[k]) for k in new
            if k in saved and k not in UNCOMPARED_FIELDS and saved[k] != new[k]}


def _describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def check_config_change(o: Options, stage_dir: str, resuming: bool) -> dict[str, tuple]:
    """Compare ``o`` with the ``config.json`` of a stage being resumed; returns the changes
    to record. A change of the model or the data is refused; other changes need
    ``--allow_config_change``. Writes nothing (see :func:`record_config`)."""
    path = os.path.join(stage_dir, CONFIG_FILE)
    if not resuming or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); it records how this stage was started: "
                        "restore it, or use another --run_dir") from None
    changes = config_changes(saved, o)
    fixed = {k: v for k, v in changes.items() if k in ARCH_DATA_FIELDS}
    if fixed:
        raise UserError(f"{stage_dir} was started with another model or data ({_describe(fixed)}); "
                        "resume it with its own flags, or use another --run_dir")
    if changes and not o.allow_config_change:
        raise UserError(f"{stage_dir} was started with other flags ({_describe(changes)}); "
                        "resume with the same flags, or pass --allow_config_change to record "
                        "the change in config_history.json")
    return changes


def record_config(o: Options, stage_dir: str, changes: dict[str, tuple]) -> None:
    """Save ``o`` as the stage's ``config.json``; ``changes`` (from
    :func:`check_config_change`) are appended to ``config_history.json`` first: the original
    options, then each resumed change with its time."""
    path = os.path.join(stage_dir, CONFIG_FILE)
    if changes:
        history_path = os.path.join(stage_dir, CONFIG_HISTORY)
        history = []
        if os.path.exists(history_path):
            with open(history_path, encoding="utf-8") as f:
                history = json.load(f)
        if not history:
            with open(path, encoding="utf-8") as f:
                history.append({"time": None, "config": json.load(f), "changed": {}})
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "config": options_to_json(o),
                        "changed": {k: {"from": old, "to": new}
                                    for k, (old, new) in changes.items()}})
        write_json_atomic(history_path, history, sort_keys=True)
        print(f"note: {stage_dir} resumes with changed flags ({_describe(changes)}); recorded "
              f"in {history_path}", file=sys.stderr)
    save_resolved(o, path)
