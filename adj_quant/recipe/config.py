"""Flags and config files for ``train.py`` and ``eval.py``.

Precedence, lowest first: built-in defaults, the config file's top level, the config
file's table for the stage being run (``[pretrain]``, ``[qat8]``, ...), then the flags
given on the command line. Flag names are those of the original Adjustable Quantization
commands (docs/method.md, "Flags"); ``--alpha``, ``--beta`` and ``--gamma`` are loss weights.
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass
class Options:
    # --- data
    dataset: str = "digits"
    img_size: int = 224
    num_classes: int | None = None
    labels_offset: int = 0
    batch_size: int = 25
    seed: int = 0
    max_val_images: int | None = None
    augment: str | None = None
    eval_crop: float = 0.875
    # --- model
    model: str = "efficientnet_b0"
    pretrained: str | None = None
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    dropout: float | None = None
    drop_connect: float | None = None
    bn_momentum: float = 0.99
    # --- quantization
    weight_bits: int = 8
    act_bits: int = 8
    swish_bits: int = 8
    bias_bits: int = 8
    bits_trainable: bool = False
    range: int = 5
    bits_grad: str = "original"
    bias_range: str = "live"
    quantize_se_gate: bool = True
    quantizer: str = "adjq"
    calib_images: int = 10000
    eval_initial_thresholds: bool = False
    # --- loss
    alpha: float = 7.0
    beta: float = 85.0
    gamma: float = 0.7
    metric: float = 0.18
    metric_style: str = "adjq"
    metric_img_size: int | None = None
    # --- optimisation
    lr: float = 3e-6
    lr_bits: float = 1e-3
    lr_fixed: bool = False
    lr_decay: float = 1e-4
    reinit: int = 800
    max_epoch: float = 2.0
    iter_train: bool = False
    iter_train_freq: int = 2
    warm_up_epoch: float = 0.0
    finetune: bool = False
    swa_delay: float | None = None
    swa_freq: float = 0.2
    jit_compile: bool = False
    # --- devices
    strategy: str = "auto"
    logical_cpus: int = 1
    worker_timeout: float = 300.0
    sync_bn: bool = False
    keep_checkpoints: int = 3
    max_loss: float | None = None
    collapse_patience: int = 3
    # --- files
    ckpt_path: str | None = None
    teacher_ckpt: str | None = None
    run_dir: str | None = None
    stage: str | None = None
    config: str | None = None
    progress: bool = True
    allow_config_change: bool = False


HELP = {
    "dataset": "'digits' (embedded default), 'synthetic', or a directory of slim ImageNet "
               "TFRecord shards (train-*-of-*, validation-*-of-*)",
    "img_size": "input image size (square)",
    "num_classes": "number of classes (default: the dataset's)",
    "labels_offset": "subtracted from TFRecord labels (1 for the slim 1001-class convention)",
    "batch_size": "images per training batch",
    "seed": "random seed for initialisation, shuffling, augmentation and dropout",
    "max_val_images": "validate on at most this many images (default: the whole split)",
    "model": "the network: a declared name (efficientnet_b0, mobilenet_v2, mobilenet_v2_140, "
             "resnet_v1_50, resnet_v1_50_keras, ...) or keras:PATH, a float Keras model file "
             "(.keras) imported with its weights",
    "pretrained": "start from public float weights: a Keras applications weights file, an "
                  "official TPU EfficientNet checkpoint or a slim checkpoint (converted into "
                  "the run, see pretrained/README.md); the recipe then starts at calibrate",
    "width_multiplier": "channel multiplier of the network (slim's MobileNet 'depth "
                        "multiplier'); 1.0 is the published network",
    "depth_multiplier": "multiplier of the blocks per stage (1.0 is the published network)",
    "augment": "training augmentation: inception (random 8-100% crop + flip), shift (small "
               "random translation) or none (default: the dataset's own for pretrain -- "
               "shift for digits, inception for TFRecords -- and none for the quantized stages)",
    "eval_crop": "fraction of the shorter side kept by the central crop of TFRecord images "
                 "(1.0: no crop)",
    "dropout": "dropout before the logits (default: 0.2 in pretrain, 0 in the quantized stages)",
    "drop_connect": "maximum drop-connect rate of the residual branches (default: 0.2 in "
                    "pretrain, 0 in the quantized stages)",
    "bn_momentum": "momentum of the batch-norm moving averages (float pretraining)",
    "weight_bits": "initial weight bits b0 (2..8)",
    "act_bits": "initial activation bits b0 (2..8)",
    "swish_bits": "swish inputs: 8 = fixed 8 bits, 0 = trainable bits from --act_bits, -1 = float",
    "bias_bits": "bias bits (2..8); 0 keeps biases float",
    "bits_trainable": "learn per-channel bit-widths (bits_scale)",
    "range": "range preset 1..7: clip intervals of range_scale and range_shift",
    "bits_grad": "estimator of the bits: original (the upper clip bound 2^b-1 passes gradient "
                 "to the bits, as the original ran) or scale_only (only through the scale)",
    "bias_range": "bias quantizer range: live (the bias tensor's own min/max at every step, "
                  "as the original) or calibrated (fixed at calibration)",
    "quantize_se_gate": "quantize the input of the SE gate's sigmoid like a swish input",
    "quantizer": "the fake quantizer: adjq (adjustable ranges and bits, the method) or lsq "
                 "(LSQ+: a learned per-channel step, and offset for activations, at the fixed "
                 "--weight_bits/--act_bits; a baseline, see docs/baselines.md)",
    "calib_images": "training images used to calibrate activation ranges",
    "eval_initial_thresholds": "also validate the quantized model with the initial thresholds",
    "alpha": "loss weight of the cross-entropy",
    "beta": "loss weight of the metric term",
    "gamma": "share of the metric gradient that goes to activation bits (1-gamma to weights)",
    "metric": "target score: the metric term pushes down above it and up below it",
    "metric_style": "counting used in the loss: adjq (the submission's) or micronet (official)",
    "metric_img_size": "image size at which the metric is counted (default: --img_size)",
    "lr": "Adam learning rate of weights, biases, range_scale and range_shift",
    "lr_bits": "Adam learning rate of bits_scale",
    "lr_fixed": "keep the learning rates constant",
    "lr_decay": "exponential decay per step of the learning rate",
    "reinit": "re-initialise the Adam slots and restart the cosine every N steps",
    "max_epoch": "epochs to train; fractional values stop after whole mini-epochs (0.3 = 3)",
    "iter_train": "iterative training: train bits only in mini-epochs k % iter_train_freq == 0",
    "iter_train_freq": "period (in mini-epochs) of the bit phases of --iter_train",
    "warm_up_epoch": "epochs before bits start training",
    "finetune": "freeze the bits (train everything except bits_scale)",
    "swa_delay": "start stochastic weight averaging after this many epochs (unset: no SWA)",
    "swa_freq": "SWA snapshot period in epochs (multiples of 0.1)",
    "keep_checkpoints": "keep the best and this many most recent checkpoints (0: keep all)",
    "jit_compile": "compile the training step with XLA",
    "strategy": "where to train (tf.distribute): auto (mirrored over all GPUs when there is "
                "more than one, else one device), default (one device), mirrored (all local "
                "GPUs, else all logical CPUs), multi_worker (one process per host, from "
                "TF_CONFIG) or tpu (see docs/distributed.md); --batch_size is the global batch",
    "logical_cpus": "split the CPU into this many logical devices (try mirrored on a machine "
                    "without GPUs; it tests the plumbing, it is not faster)",
    "worker_timeout": "seconds a multi_worker start waits for every worker of TF_CONFIG "
                      "before it gives up",
    "sync_bn": "batch norm with the statistics of the global batch, summed over all replicas "
               "(float pretraining under a multi-replica strategy)",
    "ckpt_path": "initialise from this checkpoint (a prefix, or a directory: its best one)",
    "teacher_ckpt": "float teacher checkpoint for distillation (default: the run's pretrain)",
    "run_dir": "run directory holding every stage's output (default: runs/<dataset>)",
    "stage": "run one stage: " + ", ".join(STAGES) + " (default: the whole recipe)",
    "config": "TOML config file (default for the digits recipe: configs/digits.toml)",
    "progress": "show progress bars on a terminal (off a terminal, e.g. in a log file, one "
                "plain line per mini-epoch is printed instead)",
    "max_loss": "stop when a training loss exceeds this (default: 1e6 x the stage's first "
                "mini-epoch mean loss)",
    "collapse_patience": "stop when validation top-1, after being above chance, stays at chance "
                         "level for this many mini-epochs (0: never)",
    "allow_config_change": "resume an interrupted stage with changed training flags (recorded "
                           "in config_history.json); architecture and data changes are always "
                           "refused",
}

FIELDS = {f.name: f for f in dataclasses.fields(Options)}
AUGMENTATIONS = ("inception", "shift", "none")
CHOICES = {"stage": STAGES, "metric_style": ("adjq", "micronet"),
           "bits_grad": ("original", "scale_only"), "bias_range": ("live", "calibrated"),
           "quantizer": ("adjq", "lsq"),
           "augment": AUGMENTATIONS,
           "strategy": ("auto", "default", "mirrored", "multi_worker", "tpu")}
#: Defaults that depend on the stage: float pretraining regularises, the quantized stages
#: (and evaluation, stage None) run the network as the original did, without.
PRETRAIN_ONLY = {"dropout": 0.2, "drop_connect": 0.2}


def _type_of(field: dataclasses.Field):
    text = str(field.type)
    if "bool" in text:
        return bool
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


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


def build_parser(prog: str, description: str, extra: dict[str, dict] | None = None,
                 fields: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter,
                     argument_default=argparse.SUPPRESS)
    for name in fields or FIELDS:
        kind = _type_of(FIELDS[name])
        default = FIELDS[name].default
        text = HELP[name].replace("%", "%%")  # argparse %-formats help texts
        if default is not None or "default:" not in text:
            text += f" (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=text)
        elif name in CHOICES:
            parser.add_argument(f"--{name}", type=kind, choices=CHOICES[name], help=text)
        else:
            parser.add_argument(f"--{name}", type=kind, metavar=name.upper(), help=text)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    return parser


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
    kind = _type_of(FIELDS[name])
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
    for name, value in PRETRAIN_ONLY.items():
        if values.get(name) is None:
            values[name] = value if stage == "pretrain" else 0.0
    if values.get("augment") is None and stage not in (None, "pretrain"):
        values["augment"] = "none"  # pretrain: the dataset's own (see data.default_augment)
    # Progress bars on a terminal only: in a log file their frames become endless lines
    # (the trainer prints one plain line per mini-epoch either way).
    values["progress"] = bool(values.get("progress", True)) and _stderr_is_terminal()
    options = Options(**values)
    validate(options)
    return options


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


#: Numbers that must not be negative (learning rates, loss weights, epochs, counts).
NON_NEGATIVE = ("lr", "lr_bits", "lr_decay", "alpha", "beta", "metric", "warm_up_epoch",
                "swa_delay", "labels_offset", "seed", "keep_checkpoints", "collapse_patience")
FLOAT32_MAX = 3.4028234663852886e38
MAX_EPOCHS, MAX_MULTIPLIER, MAX_IMG_SIZE = 1e6, 16.0, 4096


def validate(o: Options) -> None:
    """Refuse impossible values with one line each, before anything is written."""
    for name, field in FIELDS.items():
        value = getattr(o, name)
        if _type_of(field) is float and value is not None and not math.isfinite(value):
            raise UserError(f"--{name} {value} is not a finite number; pass a finite value")
        if _type_of(field) is float and value is not None and abs(value) > FLOAT32_MAX:
            raise UserError(f"--{name} {value} is beyond float32's range (the training runs in "
                            "float32); pass a smaller value")
    for name in NON_NEGATIVE:
        value = getattr(o, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} {value} must not be negative")
    if not 0.0 <= o.gamma <= 1.0:
        raise UserError(f"--gamma {o.gamma} is a share of the metric gradient; pass a value "
                        "in [0, 1]")
    if not 0.0 <= o.bn_momentum < 1.0:
        raise UserError(f"--bn_momentum {o.bn_momentum} must be in [0, 1)")

    def positive(name):
        if getattr(o, name) is not None and getattr(o, name) <= 0:
            raise UserError(f"--{name} {getattr(o, name)} must be positive")

    for name in ("img_size", "batch_size", "calib_images", "reinit", "iter_train_freq",
                 "max_epoch", "swa_freq", "metric_img_size", "num_classes", "max_val_images",
                 "max_loss", "logical_cpus", "worker_timeout"):
        positive(name)
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
    for name, choices in CHOICES.items():
        value = getattr(o, name)
        if value is not None and value not in choices:
            raise UserError(f"--{name} {value!r}: use one of {', '.join(choices)}")
    for name in ("dropout", "drop_connect"):
        value = getattr(o, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"--{name} {value} must be in [0, 1)")
    if not 0.0 < o.eval_crop <= 1.0:
        raise UserError(f"--eval_crop {o.eval_crop} must be a fraction in (0, 1]; 1.0 keeps "
                        "the whole image")
    from adj_quant.bits import is_bit_width
    from adj_quant.quantizers.formula import range_preset

    for name in ("weight_bits", "act_bits"):
        if not is_bit_width(getattr(o, name)):
            raise UserError(f"--{name} {getattr(o, name)} is outside [2, 8]; pass a bit-width "
                            "from 2 to 8")
    if o.bias_bits != 0 and not is_bit_width(o.bias_bits):
        raise UserError(f"--bias_bits {o.bias_bits}: use 2..8, or 0 for float biases")
    if o.swish_bits not in (8, 0, -1):
        raise UserError(f"--swish_bits {o.swish_bits} is not a swish mode; use 8 (fixed 8 bits), "
                        "0 (trainable bits from --act_bits) or -1 (not quantized)")
    try:
        range_preset(o.range)
    except UserError as err:
        raise UserError(f"--{err}") from None
    if o.quantizer == "lsq" and o.bits_trainable:
        raise UserError("--quantizer lsq runs at fixed bits and cannot take --bits_trainable; "
                        "drop --bits_trainable (pass --no-bits_trainable where a config file "
                        "sets it, e.g. the [adjustable] table), or use --quantizer adjq")
    from adj_quant.qnetwork import QuantConfig

    QuantConfig(o.weight_bits, o.act_bits, o.swish_bits, o.bias_bits, o.bits_trainable, o.range,
                o.bits_grad, o.bias_range, o.quantize_se_gate, o.quantizer)


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


#: Options that describe the data and the model, which evaluation and export take from the
#: run that trained a checkpoint (its ``config.json``) unless given on the command line.
TRAINED_FIELDS = ("dataset", "img_size", "num_classes", "labels_offset", "batch_size",
                  "eval_crop", "model", "width_multiplier", "depth_multiplier", "weight_bits", "act_bits",
                  "swish_bits", "bias_bits", "range", "bias_range", "quantize_se_gate",
                  "quantizer", "calib_images", "metric_img_size", "seed")


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

#: Options that define the model or the data of a stage: an interrupted stage never
#: resumes with other values (its checkpoints hold another model, or another data split).
ARCH_DATA_FIELDS = ("dataset", "img_size", "num_classes", "labels_offset", "eval_crop",
                    "model", "width_multiplier", "depth_multiplier", "weight_bits", "act_bits",
                    "swish_bits", "bias_bits", "bits_trainable", "range", "bias_range",
                    "quantize_se_gate", "quantizer")
#: Options that do not change what a stage computes.
#: Not compared when a stage resumes: where it runs does not change what it trains.
UNCOMPARED_FIELDS = ("progress", "config", "stage", "run_dir", "allow_config_change",
                     "strategy", "logical_cpus", "worker_timeout")
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
