"""Checkpoint quantization: bin, fixed-point and uint8 (spec: seed_quantizers.md, sections 1-2).

The formulas are pure numpy functions (float64 internally, cast back to the input dtype):

* :func:`bin_quantize` - ``2^b`` equal bins between min and max, each value replaced by its
  bin centre; the last bin is closed, so the maximum goes to the last bin centre.
* :func:`fixed_point_quantize` - the seed's decimal-shifted fixed point, saturating on both
  sides (the seed saturated only the positive side).
* :func:`uint8_quantize` / :func:`uint8_dequantize` - per-tensor affine uint8 with an exactly
  representable zero.

Checkpoint I/O reads any checkpoint that ``tf.train.load_checkpoint`` reads (TF2 object
checkpoints and name-based TF1/slim checkpoints), quantizes the trainable float variables,
copies everything else unchanged and writes the result with ``tf.raw_ops.SaveV2`` under the
same keys, dtypes and shapes, into a temporary sibling directory that is then renamed.

``uint8`` follows TensorFlow's classic ``quantize_weights`` graph transform
(``tensorflow/tools/graph_transforms/quantize_weights.cc``): only float tensors with at least
``minimum_size`` elements (default :data:`UINT8_MIN_SIZE` = 1024) are stored in 8 bits; smaller
ones (biases, batch-norm vectors, small depthwise kernels) stay float, bit for bit.

TensorFlow is imported lazily so that argument errors are reported without its start-up cost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from adj_quant import checkpoint_paths
from adj_quant.errors import UserError

ALGORITHMS = ("bin", "fixed-point", "uint8")
BIN_BITS = (1, 16)
FIXED_POINT_BITS = (2, 32)

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
UINT8_FORMAT_KEY = "_ADJQ_UINT8_FORMAT"
UINT8_MIN_SUFFIX = "/quant_min"
UINT8_MAX_SUFFIX = "/quant_max"
_VARIABLE_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# TF's quantize_weights transform: ``minimum_size`` (default 1024). A float tensor with fewer
# elements is left float; ``uint8`` applies the same rule (``--min_size``).
UINT8_MIN_SIZE = 1024
_MIN_SIZE_FIX = f"pass a whole number of elements >= 0 (default {UINT8_MIN_SIZE})"


def _tf():
    import tensorflow as tf  # noqa: PLC0415 - lazy on purpose (fast CLI errors)

    return tf


# --------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------


def _as_float64(x, what="x"):
    arr = np.asarray(x)
    x64 = arr.astype(np.float64)
    if x64.size and not np.all(np.isfinite(x64)):
        raise UserError(f"{what} contains NaN or Inf; only finite tensors can be quantized")
    return arr, x64


def _check_bits(bits, lo, hi, algorithm):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise UserError(f"bits={bits!r} is not an integer; pass an integer in {lo}..{hi} for {algorithm}")
    if not lo <= int(bits) <= hi:
        raise UserError(f"--bits {bits} is out of range for {algorithm}; use {lo}..{hi}")
    return int(bits)


def _out_dtype(arr):
    return arr.dtype if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16" else np.float32


def bin_quantize(x, bits):
    """Replace every value by the centre of its bin among ``2^bits`` equal bins in [min, max].

    Bins are ``[lo + k*w, lo + (k+1)*w)`` with ``w = (hi - lo) / 2^bits``; the last bin is closed,
    so ``max(x)`` goes to the last bin centre. A constant tensor comes back exactly.
    """
    bits = _check_bits(bits, *BIN_BITS, "bin")
    arr, x64 = _as_float64(x)
    if x64.size == 0:
        return arr.copy()
    lo, hi = float(x64.min()), float(x64.max())
    if hi == lo:
        return arr.copy()
    n = 2**bits
    w = (hi - lo) / n
    k = np.floor((x64 - lo) / w)
    k = np.where(x64 < hi, k, n - 1)
    k = np.clip(k, 0, n - 1)  # guard float rounding of (x - lo) / w just below hi
    return (lo + (k + 0.5) * w).astype(_out_dtype(arr))


def fixed_point_params(x, bits):
    """Return ``(s, f, sign, qmax)`` of the decimal-shifted fixed-point scheme for ``x``.

    ``s`` is the decimal pre-shift, ``f`` the number of fractional bits (may be negative),
    ``sign`` 1 when ``min(x) < 0``, and ``qmax = 2^(bits - sign) - 1`` the saturation bound.
    Returns ``None`` for an all-zero (or empty) tensor.
    """
    bits = _check_bits(bits, *FIXED_POINT_BITS, "fixed-point")
    _, x64 = _as_float64(x)
    if x64.size == 0 or not np.any(x64):
        return None
    m = abs(float(x64.max()))
    if m == 0.0:
        # max(x) == 0 with negative values: the seed took log2(0) here. Size the integer part
        # from the negative side instead (a documented deviation).
        m = abs(float(x64.min()))
    s = 0
    while 0 < m < 1:
        m *= 10
        s += 1
    int_bits = int(np.floor(m)).bit_length()  # == floor(log2(floor(m))) + 1, exactly
    sign = 1 if float(x64.min()) < 0 else 0
    f = bits - int_bits - sign
    qmax = 2 ** (bits - sign) - 1
    return s, f, sign, qmax


def fixed_point_quantize(x, bits):
    """The seed's decimal-shifted fixed point, saturating both sides.

    ``q = round_half_even(x * 10^s * 2^f)`` clipped to ``[-qmax, qmax]``, ``x̂ = q * 2^-f / 10^s``
    (see :func:`fixed_point_params`). An all-zero tensor stays zero.
    """
    params = fixed_point_params(x, bits)
    arr, x64 = _as_float64(x)
    if params is None:
        return arr.copy()
    s, f, _sign, qmax = params
    scale10 = 10.0**s
    q = np.rint(np.ldexp(x64 * scale10, f))  # np.rint rounds half to even
    q = np.clip(q, -qmax, qmax)
    return (np.ldexp(q, -f) / scale10).astype(_out_dtype(arr))


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def uint8_quantize(x):
    """Per-tensor affine uint8: returns ``(q_uint8, lo, hi)``.

    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` (rounded to float32, the stored precision),
    ``s = 255 / (hi - lo)``, ``q = clip(rha(x*s) - rha(lo*s), 0, 255)`` with ``rha`` rounding half
    away from zero. Zero maps to an integer level, so it comes back exactly 0.
    """
    arr, x64 = _as_float64(x)
    if x64.size == 0:
        return np.zeros(arr.shape, np.uint8), 0.0, 0.0
    lo = float(np.float32(min(float(x64.min()), 0.0)))
    hi = float(np.float32(max(float(x64.max()), 0.0)))
    if hi == lo:  # all zero
        return np.zeros(arr.shape, np.uint8), lo, hi
    s = 255.0 / (hi - lo)
    q = np.clip(_round_half_away(x64 * s) - _round_half_away(lo * s), 0, 255)
    return q.astype(np.uint8), lo, hi


def uint8_dequantize(q, lo, hi):
    """Inverse of :func:`uint8_quantize`: ``x̂ = (q + rha(lo*s)) * step`` as float32."""
    q = np.asarray(q)
    lo = float(np.float32(lo))
    hi = float(np.float32(hi))
    if hi == lo:
        return np.zeros(q.shape, np.float32)
    s = 255.0 / (hi - lo)
    step = (hi - lo) / 255.0
    return ((q.astype(np.float64) + _round_half_away(lo * s)) * step).astype(np.float32)


def relative_error(x, xhat):
    """``100 * ||xhat - x|| / ||x||`` in percent (float64); 0 for an all-zero ``x``, never NaN."""
    x64 = np.asarray(x, dtype=np.float64).ravel()
    d = np.asarray(xhat, dtype=np.float64).ravel() - x64
    nx = float(np.linalg.norm(x64))
    if nx == 0.0:
        return 0.0
    return 100.0 * float(np.linalg.norm(d)) / nx


def quantize_array(x, algorithm, bits=None):
    """Quantize-dequantize ``x`` with ``algorithm`` (``bin`` / ``fixed-point`` / ``uint8``)."""
    if algorithm == "bin":
        return bin_quantize(x, bits)
    if algorithm == "fixed-point":
        return fixed_point_quantize(x, bits)
    if algorithm == "uint8":
        q, lo, hi = uint8_quantize(x)
        return uint8_dequantize(q, lo, hi).astype(_out_dtype(np.asarray(x)))
    raise UserError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def check_bits(algorithm, bits):
    """Validate ``bits`` for ``algorithm``; returns the bits to use (8 for uint8)."""
    if algorithm == "bin":
        if bits is None:
            raise UserError("--bits is required for --algorithm bin; pass e.g. --bits 8 (1..16)")
        return _check_bits(bits, *BIN_BITS, "bin")
    if algorithm == "fixed-point":
        if bits is None:
            raise UserError("--bits is required for --algorithm fixed-point; pass e.g. --bits 8 (2..32)")
        return _check_bits(bits, *FIXED_POINT_BITS, "fixed-point")
    if algorithm == "uint8":
        if bits is not None and bits != 8:
            raise UserError(f"--bits {bits} is not supported by --algorithm uint8; omit --bits or pass 8")
        return 8
    raise UserError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")


def check_min_size(algorithm, min_size=None):
    """Validate ``min_size``, the fewest elements a variable needs to be stored in 8 bits.

    ``None`` means "not given": :data:`UINT8_MIN_SIZE` (1024) for ``uint8``, ``None`` for the other
    algorithms. A given value must be an integer >= 0, and only ``uint8`` takes one: ``bin`` and
    ``fixed-point`` keep every value float and quantize every trainable float variable, so a size
    threshold there is refused rather than silently ignored.
    """
    if min_size is None:
        return UINT8_MIN_SIZE if algorithm == "uint8" else None
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
        raise UserError(f"--min_size {min_size!r} is not an integer; {_MIN_SIZE_FIX}")
    if min_size < 0:
        raise UserError(f"--min_size {min_size} is negative; {_MIN_SIZE_FIX}")
    if algorithm != "uint8":
        raise UserError(
            f"--min_size applies only to --algorithm uint8 ({algorithm} quantizes every trainable "
            "float variable whatever its size); drop --min_size"
        )
    return int(min_size)


def _num_elements(shape):
    return int(np.prod(shape, dtype=np.int64))


# --------------------------------------------------------------------------------------
# Which variables are trainable
# --------------------------------------------------------------------------------------

TRAINABLE = "trainable"
OPTIMIZER = "optimizer"  # optimizer slots and moving-average shadows
STATE = "state"  # moving statistics, counters, optimizer hyperparameters
NON_FLOAT = "non-float"
OTHER = "other"  # object graph, non-variable saveables, empty tensors
BELOW_MIN_SIZE = "below-min-size"  # uint8: a variable to quantize with fewer than min_size elements

# Path components (lower-cased, trailing _<n> removed) naming an optimizer or an EMA shadow.
_OPTIMIZER_COMPONENTS = {
    "momentum", "adam", "adamw", "rmsprop", "adagrad", "adagradda", "proximaladagrad",
    "adadelta", "ftrl", "nadam", "adamax", "lars", "lamb", "sgd",
    "exponentialmovingaverage", "movingaverage",
}
# Names of lists of optimizer slots (Keras 3 optimizers).
_SLOT_LIST_NAMES = {
    "momentums", "velocities", "velocity_hats", "accumulators", "accumulated_grads",
    "accumulated_delta_vars", "average_gradients", "squared_accumulators", "linear_accumulators",
    "model_variables_moving_average", "u_products",
}
# Leaf names of non-trainable state.
_STATE_NAMES = {
    "moving_mean", "moving_variance", "moving_var", "running_mean", "running_var",
    "global_step", "save_counter", "step", "iter", "iterations", "learning_rate", "lr",
    "decay", "beta1_power", "beta2_power", "beta_1", "beta_2", "epsilon", "rho",
    "num_batches_tracked", "count", "num_updates", "loss_scale", "good_steps",
}
# Leaf names that are model weights for sure (override list membership, e.g. Keras 3
# optimizers list the model weights in ``_trainable_variables``).
_WEIGHT_NAMES = {
    "weights", "biases", "kernel", "bias", "gamma", "beta", "depthwise_weights",
    "depthwise_kernel", "pointwise_kernel", "recurrent_kernel", "embeddings", "alpha",
    "scale", "offset", "trainable_variables",
}
_OPTIMIZER_CHILDREN = {"iter", "_iterations", "iterations"}


def _norm(name):
    return re.sub(r"_\d+$", "", name.lstrip("_").lower())


def _classify_by_name(key):
    path = key.split("/.ATTRIBUTES/")[0]
    if ".OPTIMIZER_SLOT" in path:
        return OPTIMIZER
    comps = [c for c in path.split("/") if c]
    if any(_norm(c) in _OPTIMIZER_COMPONENTS for c in comps):
        return OPTIMIZER
    if comps and comps[-1].lower() in _STATE_NAMES:
        return STATE
    return TRAINABLE


class _ObjectGraph:
    """What the TF2 object graph says about each variable: its names and owners."""

    def __init__(self, serialized):
        from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: PLC0415

        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(serialized)
        self.incoming = {}
        self.key_to_node = {}
        self.slot_nodes = set()
        self.optimizer_nodes = set()
        for node_id, node in enumerate(graph.nodes):
            for child in node.children:
                self.incoming.setdefault(child.node_id, []).append((node_id, child.local_name))
                if child.local_name in _OPTIMIZER_CHILDREN:
                    self.optimizer_nodes.add(node_id)
            for attr in node.attributes:
                self.key_to_node[attr.checkpoint_key] = node_id
            for slot in node.slot_variables:
                self.slot_nodes.add(slot.slot_variable_node_id)

    def classify(self, key, ndim):
        node = self.key_to_node.get(key)
        if node is None:
            return None
        if node in self.slot_nodes:
            return OPTIMIZER
        aliases = []  # (owner node, name); list entries ("0", "1", ...) take the list's name
        for parent, name in self.incoming.get(node, []):
            if name.isdigit():
                aliases.extend(self.incoming.get(parent, []))
            else:
                aliases.append((parent, name))
        names = {name.lstrip("_").lower() for _, name in aliases}
        if names & _WEIGHT_NAMES:
            return TRAINABLE
        if names & _STATE_NAMES:
            return STATE
        if names & _SLOT_LIST_NAMES:
            return OPTIMIZER
        owners = {parent for parent, _ in aliases}
        if owners and owners <= self.optimizer_nodes:
            return OPTIMIZER if ndim > 0 else STATE
        return None


def classify_variables(reader, keys=None):
    """Map each checkpoint key to TRAINABLE / OPTIMIZER / STATE / NON_FLOAT / OTHER."""
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    graph = None
    if OBJECT_GRAPH_KEY in dtypes:
        try:
            graph = _ObjectGraph(reader.get_tensor(OBJECT_GRAPH_KEY))
        except Exception:  # noqa: BLE001 - an unreadable graph falls back to names
            graph = None
    out = {}
    for key in sorted(keys if keys is not None else dtypes):
        dtype = dtypes[key]
        shape = shapes[key]
        if key in (OBJECT_GRAPH_KEY, UINT8_FORMAT_KEY):
            out[key] = OTHER
        elif dtype.name not in _FLOAT_DTYPES:
            out[key] = NON_FLOAT
        elif graph is not None and "/.ATTRIBUTES/" in key and not key.endswith(_VARIABLE_VALUE):
            out[key] = OTHER  # e.g. lookup-table contents
        elif _num_elements(shape) == 0:
            out[key] = OTHER
        else:
            kind = graph.classify(key, len(shape)) if graph is not None else None
            out[key] = kind or _classify_by_name(key)
    return out


# --------------------------------------------------------------------------------------
# Checkpoint I/O
# --------------------------------------------------------------------------------------


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
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)


def _same_or_inside(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir, overwrite=False, protect=()):
    """Refuse an existing ``out_dir`` without ``overwrite``, a file, or one holding ``protect``."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    for p in protect:
        if _same_or_inside(out_dir, p):
            raise UserError(f"output directory {out_dir} contains the input checkpoint; choose another --output")
    if os.path.lexists(out_dir) and not overwrite:
        raise UserError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output path {out_dir} exists and is not a directory; remove it or choose another --output")
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
        raise UserError(f"cannot create output directory in {parent}: {err.strerror}; choose another --output") from None
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
    left_float: dict = field(default_factory=dict)  # float variables copied unchanged: key -> category

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
        raise UserError(f"{prefix} is already a uint8-quantized checkpoint; quantize the float original instead")
    kinds = classify_variables(reader)
    wanted = {TRAINABLE, OPTIMIZER} if include_optimizer_slots else {TRAINABLE}
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
        small = {k for k in to_quantize if _num_elements(shapes[k]) < min_size}
        if len(small) == len(to_quantize):
            largest = max(to_quantize, key=lambda k: (_num_elements(shapes[k]), k))
            n = _num_elements(shapes[largest])
            raise UserError(
                f"checkpoint {prefix} has no trainable float variable with at least {min_size} elements "
                f"to store in 8 bits (largest: {largest}, {n} elements); pass --min_size {n} or less"
            )
    if output_dir is None:
        output_dir = default_output_dir(prefix, algorithm, bits)
    protect = [os.path.dirname(os.path.abspath(prefix))]
    output_dir = check_output_dir(output_dir, overwrite, protect)

    tensors, out_dtypes = {}, dict(dtypes)
    result = QuantizeResult(output="", algorithm=algorithm, bits=bits, min_size=min_size)
    keys = sorted(kinds)
    tf = _tf()
    for key in progress(keys) if progress else keys:
        value = reader.get_tensor(key)
        if kinds[key] not in wanted or key in small:
            tensors[key] = value
            result.copied[key] = BELOW_MIN_SIZE if key in small else kinds[key]
            if dtypes[key].name in _FLOAT_DTYPES:
                result.left_float[key] = result.copied[key]
            continue
        value = np.asarray(value)
        try:
            if algorithm == "uint8":
                q, lo, hi = uint8_quantize(value)
                xhat = uint8_dequantize(q, lo, hi)
                for suffix, v in ((UINT8_MIN_SUFFIX, lo), (UINT8_MAX_SUFFIX, hi)):
                    if key + suffix in dtypes:
                        raise UserError(f"checkpoint already has a variable {key + suffix}; cannot store uint8 ranges")
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
    result.output = write_checkpoint_dir(
        output_dir,
        os.path.basename(prefix),
        tensors,
        out_dtypes,
        overwrite=overwrite,
        protect=protect,
    )
    return result


def _uint8_meta(reader, prefix):
    if not reader.has_tensor(UINT8_FORMAT_KEY):
        raise UserError(f"{prefix} is not a uint8-quantized checkpoint (no {UINT8_FORMAT_KEY}); load it with tf.train.load_checkpoint")
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
    out_dtypes = {k: (tf.as_dtype(meta["dtypes"][k]) if k in meta["dtypes"] else dtypes[k]) for k in values}
    if reader.has_tensor(OBJECT_GRAPH_KEY):
        values[OBJECT_GRAPH_KEY] = reader.get_tensor(OBJECT_GRAPH_KEY)
        out_dtypes[OBJECT_GRAPH_KEY] = tf.string
    values = {k: np.asarray(v).astype(out_dtypes[k].as_numpy_dtype) if k in meta["dtypes"] else v for k, v in values.items()}
    return write_checkpoint_dir(
        output_dir, os.path.basename(prefix), values, out_dtypes, overwrite=overwrite,
        protect=[os.path.dirname(os.path.abspath(prefix))],
    )
