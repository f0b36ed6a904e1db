"""The seeds' checkpoint quantizers, checkpoint side (docs/checkpoint_quantization.md):
read a checkpoint, quantize its trainable float variables with the array formulas of
:mod:`adj_quant.seed_quantizers.formulas`, copy everything else unchanged, and write the
result.

Reads any checkpoint that ``tf.train.load_checkpoint`` reads (TF2 object checkpoints and
name-based TF1/slim checkpoints); which variables are trainable is decided in
:mod:`adj_quant.seed_quantizers.variables`. The result is written with
``tf.raw_ops.SaveV2`` under the same keys, dtypes and shapes, into a temporary sibling
directory that is then renamed. ``uint8`` stores only float tensors with at least
``min_size`` elements (default :data:`UINT8_MIN_SIZE` = 1024, as TensorFlow's
``quantize_weights`` transform); smaller ones (biases, batch-norm vectors, small depthwise
kernels) stay float, bit for bit.

TensorFlow is imported lazily so that argument errors are reported without its start-up cost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from adj_quant import checkpoint_paths
from adj_quant.errors import UserError
from adj_quant.seed_quantizers.formulas import (
    UINT8_MIN_SIZE,
    check_bits,
    check_min_size,
    quantize_array,
    relative_error,
    uint8_dequantize,
    uint8_quantize,
)
from adj_quant.seed_quantizers.variables import (
    BELOW_MIN_SIZE,
    FLOAT_DTYPES,
    OBJECT_GRAPH_KEY,
    OPTIMIZER,
    TRAINABLE,
    UINT8_FORMAT_KEY,
    classify_variables,
    num_elements,
)

UINT8_MIN_SUFFIX = "/quant_min"
UINT8_MAX_SUFFIX = "/quant_max"


def _tf():
    import tensorflow as tf  # noqa: PLC0415 - lazy on purpose (fast CLI errors)

    return tf


def resolve_checkpoint(path):
    """A checkpoint prefix from a prefix, one of its files, a stage or run directory (the
    project's one rule: :func:`adj_quant.checkpoint_paths.resolve_checkpoint`)."""
    return checkpoint_paths.resolve_checkpoint(path)


class _CheckedReader:
    """A checkpoint reader whose reads of damaged files end in one
    :class:`~adj_quant.checkpoint_paths.CorruptCheckpoint` line."""

    def __init__(self, reader, prefix):
        self._reader, self._prefix = reader, prefix

    def get_tensor(self, key):
        with checkpoint_paths.reading(self._prefix):
            return self._reader.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self._reader, name)


def load_reader(prefix):
    tf = _tf()
    with checkpoint_paths.reading(prefix):
        try:
            return _CheckedReader(tf.train.load_checkpoint(prefix), prefix)
        except ValueError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot read checkpoint {prefix}: {first}") from None


def _write_state_file(directory, basename):
    esc = basename.replace("\\", "\\\\").replace('"', '\\"')
    with open(os.path.join(directory, "checkpoint"), "w", encoding="utf-8") as fh:
        fh.write(f'model_checkpoint_path: "{esc}"\nall_model_checkpoint_paths: "{esc}"\n')


def save_tensors(prefix, tensors, dtypes):
    """Write ``{key: np.ndarray}`` with ``tf.raw_ops.SaveV2`` (keys, dtypes, shapes as given)."""
    tf = _tf()
    names = sorted(tensors)
    values = [tf.convert_to_tensor(tensors[n], dtype=dtypes[n]) for n in names]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=values)


def _same_or_inside(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir, overwrite=False, protect=()):
    """Refuse an existing ``out_dir`` without ``overwrite``, a file, or one holding ``protect``."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    for p in protect:
        if _same_or_inside(out_dir, p):
            raise UserError(f"output directory {out_dir} contains the input checkpoint; "
                            "choose another --output")
    if os.path.lexists(out_dir) and not overwrite:
        raise UserError(f"output directory {out_dir} already exists; "
                        "pass --overwrite to replace it")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output path {out_dir} exists and is not a directory; "
                        "remove it or choose another --output")
    return out_dir


def write_checkpoint_dir(out_dir, basename, tensors, dtypes, overwrite=False, protect=()):
    """Write a checkpoint ``out_dir/basename`` plus a ``checkpoint`` state file, atomically.

    The files go into a temporary sibling directory that is renamed to ``out_dir``. An existing
    ``out_dir`` is refused unless ``overwrite``; then it is replaced (moved aside, the new one
    renamed in, the old one removed). ``protect`` lists paths ``out_dir`` must not contain.
    """
    out_dir = check_output_dir(out_dir, overwrite, protect)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as err:
        raise UserError(f"cannot create output directory in {parent}: {err.strerror}; "
                        "choose another --output") from None
    try:
        save_tensors(os.path.join(tmp, basename), tensors, dtypes)
        _write_state_file(tmp, basename)
        os.chmod(tmp, 0o755)
        if os.path.lexists(out_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            old = os.path.join(trash, "old")
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, basename)


@dataclass
class QuantizeResult:
    output: str
    algorithm: str
    bits: int
    errors: dict = field(default_factory=dict)
    copied: dict = field(default_factory=dict)  # key -> category
    min_size: int | None = None  # uint8 only
    # float variables copied unchanged: key -> category
    left_float: dict = field(default_factory=dict)

    @property
    def num_quantized(self):
        return len(self.errors)

    @property
    def num_copied(self):
        return len(self.copied)

    @property
    def num_below_min_size(self):
        return sum(1 for kind in self.copied.values() if kind == BELOW_MIN_SIZE)

    def summary(self):
        """Counts and errors; for ``uint8`` also ``min_size``, ``num_8bit`` (variables stored in
        8 bits), ``num_left_float``, ``num_below_min_size`` and ``left_float`` (key -> why)."""
        errs = list(self.errors.values())
        out = {
            "output": self.output,
            "algorithm": self.algorithm,
            "bits": self.bits,
            "num_quantized": self.num_quantized,
            "num_copied": self.num_copied,
        }
        if self.algorithm == "uint8":
            out.update({
                "min_size": self.min_size,
                "num_8bit": self.num_quantized,
                "num_left_float": len(self.left_float),
                "num_below_min_size": self.num_below_min_size,
                "left_float": dict(sorted(self.left_float.items())),
            })
        out.update({
            "min_error": min(errs) if errs else 0.0,
            "max_error": max(errs) if errs else 0.0,
            "avg_error": float(np.mean(errs)) if errs else 0.0,
            "errors": dict(self.errors),
        })
        return out


def default_output_dir(prefix, algorithm, bits):
    base = os.path.dirname(os.path.abspath(prefix))
    name = "uint8" if algorithm == "uint8" else f"{algorithm}_{bits}bits"
    return os.path.join(base, name)


def quantize_checkpoint(
    prefix,
    algorithm,
    bits=None,
    output_dir=None,
    overwrite=False,
    include_optimizer_slots=False,
    progress=None,
    *,
    min_size=UINT8_MIN_SIZE,
):
    """Quantize the trainable float variables of checkpoint ``prefix``; copy the rest.

    ``progress`` wraps the list of keys (e.g. ``tqdm``). Returns a :class:`QuantizeResult`.
    For ``uint8`` each quantized ``key`` is stored as uint8 plus ``key/quant_min`` and
    ``key/quant_max`` float32 scalars; read it back with :func:`load_uint8_checkpoint`.

    ``min_size`` (``uint8`` only): a variable is stored in 8 bits iff it is floating point (and
    trainable, or an optimizer slot with ``include_optimizer_slots``) and has at least
    ``min_size`` elements; smaller ones are copied unchanged, bit for bit. The rule and its
    default come from TensorFlow's ``quantize_weights`` graph transform (``minimum_size=1024``),
    which likewise leaves biases and batch-norm vectors in float. ``min_size=0`` stores every
    such variable in 8 bits; ``None`` means the default. ``bin`` and ``fixed-point`` take no size
    threshold: any ``min_size`` other than the default is refused for them (:func:`check_min_size`).
    """
    bits = check_bits(algorithm, bits)
    is_int = isinstance(min_size, (int, np.integer)) and not isinstance(min_size, bool)
    if algorithm != "uint8" and is_int and min_size == UINT8_MIN_SIZE:
        min_size = None  # the default: no size threshold for bin / fixed-point
    min_size = check_min_size(algorithm, min_size)
    prefix = resolve_checkpoint(prefix)
    reader = load_reader(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    if UINT8_FORMAT_KEY in dtypes:
        raise UserError(f"{prefix} is already a uint8-quantized checkpoint; "
                        "quantize the float original instead")
    kinds = classify_variables(reader)
    wanted = {TRAINABLE, OPTIMIZER} if include_optimizer_slots else {TRAINABLE}
    small = _below_min_size(reader, prefix, kinds, wanted, algorithm, min_size)
    if output_dir is None:
        output_dir = default_output_dir(prefix, algorithm, bits)
    protect = [os.path.dirname(os.path.abspath(prefix))]
    output_dir = check_output_dir(output_dir, overwrite, protect)

    result = QuantizeResult(output="", algorithm=algorithm, bits=bits, min_size=min_size)
    tensors, out_dtypes = _quantized_tensors(reader, kinds, wanted, small, result, progress)
    result.output = write_checkpoint_dir(
        output_dir,
        os.path.basename(prefix),
        tensors,
        out_dtypes,
        overwrite=overwrite,
        protect=protect,
    )
    return result


def _below_min_size(reader, prefix, kinds, wanted, algorithm, min_size):
    """The variables to quantize that ``uint8`` leaves float (fewer than ``min_size``
    elements); refuses a checkpoint with nothing to quantize."""
    dtypes = reader.get_variable_to_dtype_map()
    to_quantize = [k for k, kind in kinds.items() if kind in wanted]
    if not to_quantize:
        sample = ", ".join(f"{k} ({dtypes[k].name}, {kinds[k]})" for k in sorted(kinds)[:3])
        raise UserError(
            f"checkpoint {prefix} has no trainable float variables to quantize "
            f"({len(kinds)} variables{': ' + sample if sample else ''})"
        )
    small = set()
    if algorithm == "uint8":
        shapes = reader.get_variable_to_shape_map()
        small = {k for k in to_quantize if num_elements(shapes[k]) < min_size}
        if len(small) == len(to_quantize):
            largest = max(to_quantize, key=lambda k: (num_elements(shapes[k]), k))
            n = num_elements(shapes[largest])
            raise UserError(
                f"checkpoint {prefix} has no trainable float variable with at least {min_size} "
                f"elements to store in 8 bits (largest: {largest}, {n} elements); "
                f"pass --min_size {n} or less"
            )
    return small


def _quantized_tensors(reader, kinds, wanted, small, result, progress):
    """``(tensors, dtypes)`` of the output checkpoint: the variables in ``wanted`` (not in
    ``small``) quantized with ``result.algorithm``, the others copied; fills ``result``."""
    algorithm, bits = result.algorithm, result.bits
    dtypes = reader.get_variable_to_dtype_map()
    tensors, out_dtypes = {}, dict(dtypes)
    keys = sorted(kinds)
    tf = _tf()
    for key in progress(keys) if progress else keys:
        value = reader.get_tensor(key)
        if kinds[key] not in wanted or key in small:
            tensors[key] = value
            result.copied[key] = BELOW_MIN_SIZE if key in small else kinds[key]
            if dtypes[key].name in FLOAT_DTYPES:
                result.left_float[key] = result.copied[key]
            continue
        value = np.asarray(value)
        try:
            if algorithm == "uint8":
                q, lo, hi = uint8_quantize(value)
                xhat = uint8_dequantize(q, lo, hi)
                for suffix, v in ((UINT8_MIN_SUFFIX, lo), (UINT8_MAX_SUFFIX, hi)):
                    if key + suffix in dtypes:
                        raise UserError(f"checkpoint already has a variable {key + suffix}; "
                                        "cannot store uint8 ranges")
                    tensors[key + suffix] = np.float32(v)
                    out_dtypes[key + suffix] = tf.float32
                tensors[key] = q
                out_dtypes[key] = tf.uint8
            else:
                xhat = quantize_array(value, algorithm, bits)
                tensors[key] = xhat
        except UserError as err:
            raise UserError(f"variable {key}: {err}") from None
        result.errors[key] = relative_error(value, xhat)
    if algorithm == "uint8":
        meta = {"version": 1, "dtypes": {k: dtypes[k].name for k in result.errors}}
        tensors[UINT8_FORMAT_KEY] = np.array(json.dumps(meta, sort_keys=True).encode())
        out_dtypes[UINT8_FORMAT_KEY] = tf.string
    return tensors, out_dtypes


def _uint8_meta(reader, prefix):
    if not reader.has_tensor(UINT8_FORMAT_KEY):
        raise UserError(f"{prefix} is not a uint8-quantized checkpoint (no {UINT8_FORMAT_KEY}); "
                        "load it with tf.train.load_checkpoint")
    return json.loads(reader.get_tensor(UINT8_FORMAT_KEY).decode())


def load_uint8_checkpoint(path):
    """Read a uint8 checkpoint: ``{key: array}`` with the quantized variables dequantized to
    float32 and every other variable as stored (the object graph and range keys are left out)."""
    prefix = resolve_checkpoint(path)
    reader = load_reader(prefix)
    meta = _uint8_meta(reader, prefix)
    quantized = set(meta["dtypes"])
    skip = {OBJECT_GRAPH_KEY, UINT8_FORMAT_KEY}
    skip |= {k + s for k in quantized for s in (UINT8_MIN_SUFFIX, UINT8_MAX_SUFFIX)}
    out = {}
    for key in reader.get_variable_to_dtype_map():
        if key in skip:
            continue
        if key in quantized:
            lo = reader.get_tensor(key + UINT8_MIN_SUFFIX)
            hi = reader.get_tensor(key + UINT8_MAX_SUFFIX)
            out[key] = uint8_dequantize(reader.get_tensor(key), lo, hi)
        else:
            out[key] = reader.get_tensor(key)
    return out


def uint8_to_float_checkpoint(path, output_dir, overwrite=False):
    """Turn a uint8 checkpoint back into an ordinary float checkpoint (original keys and dtypes)."""
    tf = _tf()
    prefix = resolve_checkpoint(path)
    reader = load_reader(prefix)
    meta = _uint8_meta(reader, prefix)
    values = load_uint8_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    out_dtypes = {k: (tf.as_dtype(meta["dtypes"][k]) if k in meta["dtypes"] else dtypes[k])
                  for k in values}
    if reader.has_tensor(OBJECT_GRAPH_KEY):
        values[OBJECT_GRAPH_KEY] = reader.get_tensor(OBJECT_GRAPH_KEY)
        out_dtypes[OBJECT_GRAPH_KEY] = tf.string
    values = {k: np.asarray(v).astype(out_dtypes[k].as_numpy_dtype) if k in meta["dtypes"] else v
              for k, v in values.items()}
    return write_checkpoint_dir(
        output_dir, os.path.basename(prefix), values, out_dtypes, overwrite=overwrite,
        protect=[os.path.dirname(os.path.abspath(prefix))],
    )
