"""The packed adjq file: a quantized network at its learned bits (``adjq-export --format
packed``, :func:`load_packed`). Layout: docs/export.md, "The packed file".

The container is a safetensors file (named byte buffers and a JSON header). Its
``__metadata__`` holds ``adjq`` (a JSON string: format, version, the network declaration
and quantization settings, the counted weight bits, the layer and activation-site order and
the per-kind index of the grouped tensors) and ``checksum`` (SHA-256 over
every tensor's name, dtype, shape and bytes and over ``adjq``).

Tensors, for every layer ``<scope>`` (stored grouped: one safetensors tensor per kind, the
concatenation over all layers in order, ``index`` in the metadata giving each layer's count;
:func:`_ungroup` splits them):

* ``<scope>/weights/codes`` (U8): the integer code ``c = k - z_c`` in ``[0, 2^b_c - 1]`` of
  every stored weight, bit-packed MSB first at exactly ``b_c`` bits, output channel by
  output channel (the layer's TF layout with the output axis moved to the front);
* ``<scope>/weights/scale`` (F32), ``/zero_point`` (I8/I16/I32): one per stored output
  channel; the weight is ``(c + z_c) / s_c`` in float32; ``/bits`` (U8): one per output
  channel (a removed channel's bits still count in the score's parameter count). A symmetric
  grid (``--symmetric_weights``, declared in the network's quantization settings) has
  ``z_c = -(2^(b_c - 1) - 1)``, its codes run from 0 to ``2^b_c - 2``;
* ``<scope>/weights/channels`` (U8, packbits over the output channels): present when pruning
  removed channels; only the kept channels are stored;
* ``<scope>/weights/mask`` (U8, packbits over the stored channels' weights): present when
  pruning removed weights inside kept channels; only the kept weights have codes;
* ``<scope>/biases`` (F32, the BN-folded bias variable) and, with quantized biases,
  ``<scope>/bias_quant/<variable>`` (the bias quantizer's variables: its base range follows
  the biases, so they are stored as they are).

For every activation quantizer ``<site>`` (``<scope>/input``, ``/swish_input``,
``/sigmoid_input``; grouped as ``activations/<kind>``): its adjusted range ``<site>/min``
(``L``), ``/width`` (``W``) and ``/bits`` per channel (F32, F32, U8); its grid is
``s = (2^b - 1) / (W + 1e-7)``, ``z = round(L s)``, as the quantizer computes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

from adj_quant.errors import UserError

FORMAT = "adjq-packed"
VERSION = 1
#: Default file name beside a checkpoint.
FILE_NAME = "model_packed.safetensors"
_EPSILON = np.float32(1e-7)       # the quantizer's width epsilon (formula.EPSILON)
_F32_MAX = np.float32(np.finfo(np.float32).max)
_F32_TINY = np.float32(np.finfo(np.float32).tiny)
_MAX_CODE = np.float32(2.0 ** 124)
_ACTIVATION_SITES = ("/input", "/swish_input", "/sigmoid_input")


# --------------------------------------------------------------------------- bit packing


def pack_codes(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Unsigned ``codes`` at ``widths`` bits each (1..8), MSB first, as packed bytes."""
    codes = np.asarray(codes, np.int64).ravel()
    widths = np.broadcast_to(np.asarray(widths, np.int64), codes.shape).ravel()
    if codes.size == 0:
        return np.zeros(0, np.uint8)
    if np.any(codes < 0) or np.any(codes >= (1 << widths)):
        raise ValueError("a code does not fit its bit-width")
    cols = np.arange(8)
    bitmat = (codes[:, None] >> (7 - cols)[None, :]) & 1
    keep = cols[None, :] >= (8 - widths)[:, None]
    return np.packbits(bitmat[keep].astype(np.uint8))


def unpack_codes(data: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_codes`; ``data`` must hold exactly ``ceil(sum(widths)/8)``
    bytes."""
    widths = np.asarray(widths, np.int64).ravel()
    total = int(widths.sum())
    if len(data) != (total + 7) // 8:
        raise ValueError(f"{len(data)} code bytes, expected {(total + 7) // 8}")
    if widths.size == 0:
        return np.zeros(0, np.int64)
    bits = np.unpackbits(np.asarray(data, np.uint8))[:total].astype(np.int64)
    starts = np.cumsum(widths) - widths
    cols = np.arange(8)
    valid = cols[None, :] >= (8 - widths)[:, None]
    index = np.where(valid, starts[:, None] + cols[None, :] - (8 - widths)[:, None], 0)
    return (bits[index] * valid * (1 << (7 - cols))[None, :]).sum(axis=1)


def _int_array(values) -> np.ndarray:
    values = np.asarray(values, np.int64)
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(dtype)
    raise ValueError("a zero point beyond int32")


# --------------------------------------------------------------------------- quantizer grids


def _levels(bits: np.ndarray) -> np.ndarray:
    """``2^b - 1`` as the quantizer computes it (``tf.pow`` in float32)."""
    import tensorflow as tf

    return (tf.pow(tf.constant(2.0, tf.float32), tf.constant(bits, tf.float32)) - 1.0).numpy()


def quantizer_grid(quant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s, z, b)`` per channel of an adjustable quantizer with a calibrated base range:
    its output is ``clip(round(x s), z, z + 2^b - 1) / s`` (float32), the formula's terms
    computed with the same float32 operations as
    :func:`adj_quant.quantizers.formula._fake_quantize_math`.

    A symmetric quantizer (``--symmetric_weights``) has ``s = n / (A + 1e-7)`` with
    ``n = 2^(b-1) - 1`` and the levels ``k``, ``|k| <= n``: its zero point is ``z = -n``, so
    that the codes ``k - z`` run from 0 to ``2 n = 2^b - 2`` as every packed code does
    (:func:`adj_quant.quantizers.formula._symmetric_scale` computes ``s``)."""
    import tensorflow as tf

    if getattr(quant, "symmetric", False):
        from adj_quant.quantizers.formula import _symmetric_scale

        bits = quant.bits()
        scale, half = _symmetric_scale(quant.amplitude(), bits, quant.bits_grad)
        return (scale.numpy().astype(np.float32), -half.numpy().astype(np.int64),
                bits.numpy().astype(np.int64))
    low, width = quant.adjusted_range()
    bits = quant.bits()
    low = tf.clip_by_value(low, -float(_F32_MAX), float(_F32_MAX))
    width = tf.clip_by_value(width, 0.0, float(_F32_MAX))
    levels = tf.pow(tf.constant(2.0, tf.float32), bits) - 1.0
    scale = levels / (width + float(_EPSILON))
    scale = tf.minimum(tf.maximum(scale, float(_F32_TINY)), float(_MAX_CODE) / tf.abs(low))
    zero = tf.round(low * scale)
    return (scale.numpy().astype(np.float32), zero.numpy().astype(np.int64),
            bits.numpy().astype(np.int64))


def _nearby(value: np.float32, steps: int = 6):
    """``value`` and its float32 neighbours, nearest first."""
    yield np.float32(value)
    up = down = np.float32(value)
    for _ in range(steps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        yield up
        yield down


def _width_for(s: np.float32, lv: np.float32) -> np.float32 | None:
    """A width ``W >= 0`` with ``fl(lv / fl(W + 1e-7)) = s`` (None if there is none)."""
    for d in _nearby(np.float32(np.float64(lv) / np.float64(s))):
        if np.float32(lv / d) != s:
            continue
        for w in _nearby(np.float32(np.float64(d) - np.float64(_EPSILON))):
            if w >= 0 and np.float32(w + _EPSILON) == d:
                return w
    return None


def quantizer_variables(scale, zero, bits, *, init_bits: int, bits_trainable: bool, levels,
                        who: str) -> dict[str, np.ndarray]:
    """Variables of an adjustable quantizer whose grid is exactly ``(scale, zero, bits)``.

    Shift 0 makes ``L = m``; the base width ``w = M - m`` is a power of two ``P`` with
    ``fl(M - m) = P`` exactly, and ``range_scale = W / P`` in ``(0.5, 1]`` (inside every
    range preset's clip), so ``W = P range_scale`` exactly. ``W`` is chosen so that
    ``fl(n / fl(W + 1e-7)) = s`` and ``m`` so that ``round(fl(m s)) = z``.
    """
    scale, zero, bits = (np.asarray(v) for v in (scale, zero, bits))
    n = len(scale)
    out = {k: np.zeros(n, np.float32) for k in ("init_min", "init_max", "range_scale",
                                                "range_shift")}
    if bits_trainable:
        out["bits_scale"] = np.zeros(n, np.float32)
    for c in range(n):
        s, z, b, lv = np.float32(scale[c]), int(zero[c]), int(bits[c]), np.float32(levels[c])
        if not bits_trainable and b != init_bits:
            raise UserError(f"{who}: channel {c} has {b} bits but the network's quantizer is "
                            f"fixed at {init_bits}; the file does not match its declaration")
        width = _width_for(s, lv)
        if width is None:
            raise UserError(f"{who}: channel {c} scale {s!r} is not a quantizer's scale")
        target = np.float64(z) / np.float64(s)
        found = None
        if width == 0:
            for m in _nearby(np.float32(target)):
                if np.round(np.float32(m * s)) == z:
                    found = (m, m, np.float32(1.0))
                    break
        else:
            e = math.ceil(math.log2(float(width)))
            power = np.float32(2.0 ** e)
            for j in range(40):
                g = 2.0 ** (e - 23 + j)
                m = np.float32(round(target / g) * g)
                big = np.float32(m + power)
                if np.round(np.float32(m * s)) == z and np.float32(big - m) == power:
                    found = (m, big, np.float32(width / power))
                    break
        if found is None:
            raise UserError(f"{who}: channel {c} zero point {z} does not fit scale {s!r}")
        out["init_min"][c], out["init_max"][c], out["range_scale"][c] = found
        if bits_trainable:
            out["bits_scale"][c] = np.float32(b / init_bits)
    return out


def symmetric_variables(scale, zero, bits, *, init_bits: int, bits_trainable: bool,
                        who: str) -> dict[str, np.ndarray]:
    """Variables of a symmetric adjustable quantizer whose grid is exactly ``(scale, -n,
    bits)``, ``n = 2^(b-1) - 1``: the base range ``[-A, A]``, ``range_scale`` 1 (inside
    every preset's clip) and shift 0, with ``A`` chosen so that ``fl(n / fl(A + 1e-7)) = s``."""
    scale, zero, bits = (np.asarray(v) for v in (scale, zero, bits))
    n = len(scale)
    out = {"init_min": np.zeros(n, np.float32), "init_max": np.zeros(n, np.float32),
           "range_scale": np.ones(n, np.float32), "range_shift": np.zeros(n, np.float32)}
    if bits_trainable:
        out["bits_scale"] = (bits / np.float32(init_bits)).astype(np.float32)
    for c in range(n):
        b, half = int(bits[c]), 2 ** (int(bits[c]) - 1) - 1
        if not bits_trainable and b != init_bits:
            raise UserError(f"{who}: channel {c} has {b} bits but the network's quantizer is "
                            f"fixed at {init_bits}; the file does not match its declaration")
        if int(zero[c]) != -half:
            raise UserError(f"{who}: channel {c} zero point {int(zero[c])} is not the "
                            f"symmetric grid's {-half}; the file does not match its declaration")
        amplitude = _width_for(np.float32(scale[c]), np.float32(half))
        if amplitude is None:
            raise UserError(f"{who}: channel {c} scale {scale[c]!r} is not a quantizer's scale")
        out["init_min"][c], out["init_max"][c] = -amplitude, amplitude
    return out


def range_variables(low, width, bits, *, init_bits: int, bits_trainable: bool,
                    alpha: tuple[float, float], who: str) -> dict[str, np.ndarray]:
    """Variables of an adjustable quantizer whose adjusted range is exactly ``(low, width)``
    (float32): shift 0 makes ``L = m = low``; ``M`` near ``low + width`` and ``range_scale``
    near ``width / (M - m)`` are searched so that ``fl(fl(M - m) range_scale) = width``."""
    low, width, bits = (np.asarray(v) for v in (low, width, bits))
    n = len(low)
    out = {"init_min": low.astype(np.float32), "init_max": np.zeros(n, np.float32),
           "range_scale": np.ones(n, np.float32), "range_shift": np.zeros(n, np.float32)}
    if bits_trainable:
        out["bits_scale"] = (bits / np.float32(init_bits)).astype(np.float32)
    elif np.any(bits != init_bits):
        raise UserError(f"{who}: bits {sorted(set(bits.tolist()))} but the network's quantizer "
                        f"is fixed at {init_bits}; the file does not match its declaration")
    for c in range(n):
        lo, wd = np.float32(low[c]), np.float32(width[c])
        if wd == 0:
            out["init_max"][c] = lo
            continue
        found = False
        for big in _nearby(np.float32(lo + wd), 3):
            w = np.float32(big - lo)
            if not np.isfinite(w) or w <= 0:
                continue
            for rs in _nearby(np.float32(np.float64(wd) / np.float64(w)), 4):
                if alpha[0] <= rs <= alpha[1] and np.float32(w * rs) == wd:
                    out["init_max"][c], out["range_scale"][c] = big, rs
                    found = True
                    break
            if found:
                break
        if not found:
            raise UserError(f"{who}: channel {c} range ({lo!r}, {wd!r}) cannot be rebuilt")
    return out


def _probe(quant, scale, zero, levels) -> bool:
    """Whether ``quant`` maps the grid points ``k / s`` (k from z - 1 to z + n + 1) to
    ``clip(k, z, z + n) / s`` on every channel."""
    import tensorflow as tf

    n = int(np.max(levels)) if len(levels) else 0
    k = zero[None, :] + np.arange(-1, n + 2)[:, None]            # [n + 3, C]
    x = (k.astype(np.float32) / scale[None, :]).astype(np.float32)
    want = (np.clip(k, zero, zero + levels.astype(np.int64)).astype(np.float32)
            / scale[None, :]).astype(np.float32)
    got = quant(tf.constant(x)).numpy()
    return bool(np.array_equal(got, want))


# --------------------------------------------------------------------------- writing


def _out_axis(layer) -> int:
    return 2 if layer.kind == "dws" else len(layer.weights.shape) - 1


def _checksum(tensors: dict, adjq: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    digest.update(adjq.encode())
    return "sha256:" + digest.hexdigest()


def pack(model, spec) -> tuple[bytes, dict]:
    """The packed file's bytes for a restored quantized ``model`` (its
    :class:`~adj_quant.checkpoints.ModelSpec` ``spec``) and a summary: per layer the learned
    bits and stored bytes, and the totals."""
    import safetensors.numpy as st

    if spec.kind != "quant":
        raise UserError("--format packed needs a quantized checkpoint (a qat8, adjustable or "
                        "finetune stage); this one holds a float model")
    if spec.quant.quantizer != "adjq":
        raise UserError(f"--format packed stores the adjustable quantizer's grids; this model "
                        f"uses quantizer {spec.quant.quantizer!r}: export it as tflite instead")
    tensors: dict[str, np.ndarray] = {}
    layers_meta, rows = {}, []
    weight_bits = 0
    for scope, layer in model.layers.items():
        quant = layer.weight_quant
        if quant.live_range:
            raise UserError(f"{scope}: a weight quantizer with a live range cannot be packed")
        axis = _out_axis(layer)
        fq = quant(layer.weights).numpy()
        s, z, b = quantizer_grid(quant)
        shape_c = [1] * fq.ndim
        shape_c[axis] = -1
        k = np.round(fq * s.reshape(shape_c)).astype(np.float32)
        if not np.array_equal((k / s.reshape(shape_c)).astype(np.float32), fq):
            raise RuntimeError(f"{scope}: the fake-quantized weights are not k / s")
        codes = np.moveaxis(k.astype(np.int64), axis, 0).reshape(fq.shape[axis], -1)
        codes = codes - z[:, None]
        if np.any(codes < 0) or np.any(codes > (1 << b)[:, None] - 1):
            raise RuntimeError(f"{scope}: a weight code lies outside its channel's grid")
        if layer.mask is not None:
            mask = np.moveaxis(layer.mask.numpy(), axis, 0).reshape(fq.shape[axis], -1) > 0
        else:
            mask = np.ones(codes.shape, bool)
        kept = mask.any(axis=1)
        if not kept.all():
            tensors[f"{scope}/weights/channels"] = np.packbits(kept.astype(np.uint8))
        sparse = not mask[kept].all()
        if sparse:
            tensors[f"{scope}/weights/mask"] = np.packbits(mask[kept].astype(np.uint8).ravel())
            stored = codes[kept][mask[kept]]
            widths = np.broadcast_to(b[kept][:, None], mask[kept].shape)[mask[kept]]
        else:
            stored = codes[kept].ravel()
            widths = np.broadcast_to(b[kept][:, None], codes[kept].shape).ravel()
        tensors[f"{scope}/weights/codes"] = pack_codes(stored, widths)
        tensors[f"{scope}/weights/scale"] = s[kept]
        tensors[f"{scope}/weights/zero_point"] = _int_array(z[kept])
        tensors[f"{scope}/weights/bits"] = b.astype(np.uint8)  # every channel: the score
        tensors[f"{scope}/biases"] = layer.biases.numpy().astype(np.float32)
        if layer.bias_quant is not None:
            for var in layer.bias_quant.trainable_variables + (
                    layer.bias_quant.init_min, layer.bias_quant.init_max):
                key = var.name.split("/")[-1].split(":")[0]
                tensors[f"{scope}/bias_quant/{key}"] = var.numpy().astype(np.float32)
        counted = int(widths.sum())
        weight_bits += counted
        layers_meta[scope] = {"encoding": "bitmask" if sparse else "dense",
                              "channels": int(kept.sum()), "weights": int(widths.size)}
        rows.append({"layer": scope, "bits": sorted(set(b[kept].tolist())),
                     "channels": int(kept.sum()), "of": int(len(kept)),
                     "encoding": layers_meta[scope]["encoding"],
                     "code_bytes": int(tensors[f"{scope}/weights/codes"].size),
                     "counted_bits": counted})
    for name, quant in model.quantizers().items():
        if not name.endswith(_ACTIVATION_SITES):
            continue
        if quant.live_range:
            raise UserError(f"{name}: an activation quantizer with a live range cannot be packed")
        s, z, b = quantizer_grid(quant)
        if not _probe(quant, s, z, _levels(b).astype(np.int64)):
            raise RuntimeError(f"{name}: the quantizer's grid is not (s, z, b)")
        low, width = (v.numpy().astype(np.float32) for v in quant.adjusted_range())
        tensors[f"{name}/min"] = low
        tensors[f"{name}/width"] = width
        tensors[f"{name}/bits"] = b.astype(np.uint8)
    sites = [n for n in model.quantizers() if n.endswith(_ACTIVATION_SITES)]
    grouped, index = _group(tensors, list(model.layers), sites)
    adjq = json.dumps({"format": FORMAT, "version": VERSION, "model": spec.to_json(),
                       "weight_bits": weight_bits,
                       "owners": {"layers": list(model.layers), "sites": sites},
                       "index": index}, sort_keys=True)
    data = st.save(grouped, metadata={"adjq": adjq, "checksum": _checksum(grouped, adjq)})
    payload = sum(int(tensors[f"{s}/weights/codes"].size) for s in model.layers)
    return data, {"layers": rows, "weight_bits": weight_bits, "code_bytes": payload,
                  "size_bytes": len(data)}


# --------------------------------------------------------------------------- grouping

#: Per-layer and per-activation-site tensors, each stored as one concatenation over all
#: layers (sites) in order; ``index[kind]`` lists every owner's element count. One header
#: entry per kind instead of per tensor keeps the safetensors header small.
_LAYER_KINDS = ("weights/codes", "weights/scale", "weights/zero_point", "weights/bits",
                "weights/channels", "weights/mask", "biases", "bias_quant/init_min",
                "bias_quant/init_max", "bias_quant/range_scale", "bias_quant/range_shift",
                "bias_quant/bits_scale")
_SITE_KINDS = ("min", "width", "bits")
#: Kinds a layer may lack (0 elements in the index means absent).
_OPTIONAL = ("weights/channels", "weights/mask", "bias_quant/")


def _group(tensors: dict, layers: list, sites: list) -> tuple[dict, dict]:
    grouped, index = {}, {}
    for kinds, owners, prefix in ((_LAYER_KINDS, layers, ""), (_SITE_KINDS, sites,
                                                               "activations/")):
        for kind in kinds:
            parts = [tensors.get(f"{owner}/{kind}") for owner in owners]
            if all(part is None for part in parts):
                continue
            index[prefix + kind] = [0 if part is None else int(part.size) for part in parts]
            flat = [part.ravel() for part in parts if part is not None]
            joined = np.concatenate(flat)
            if kind == "weights/zero_point":
                joined = _int_array(joined)
            grouped[prefix + kind] = joined
    return grouped, index


def _ungroup(adjq: dict, grouped: dict, path: str) -> dict:
    """The per-layer / per-site tensors of a grouped file (a wrong index is a UserError)."""
    try:
        owners, index = adjq["owners"], adjq["index"]
        tensors = {}
        for name, counts in index.items():
            kind_owners = owners["sites"] if name.startswith("activations/") else owners["layers"]
            kind = name[len("activations/"):] if name.startswith("activations/") else name
            values = grouped[name]
            if len(counts) != len(kind_owners) or sum(counts) != values.size:
                raise ValueError(f"{name} holds {values.size} values, its index "
                                 f"{sum(counts)} over {len(counts)} owners")
            start = 0
            for owner, count in zip(kind_owners, counts):
                if count or not kind.startswith(_OPTIONAL):
                    tensors[f"{owner}/{kind}"] = values[start:start + count]
                start += count
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: its tensor index does not match its tensors ({err}); "
                        "export it again") from None
    return tensors


# --------------------------------------------------------------------------- reading


def _header(data: bytes, path: str) -> dict:
    if len(data) < 8:
        raise UserError(f"{path}: truncated packed file ({len(data)} bytes); export it again")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise UserError(f"{path}: truncated packed file (its header needs {size} bytes, "
                        f"{len(data) - 8} follow); export it again")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: corrupt packed file (its header is not JSON); export it "
                        "again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt packed file (its header is not a JSON object)")
    return header


def read_packed(path) -> tuple[dict, dict]:
    """``(adjq metadata, tensors)`` of a packed file, checked: container, format, version
    and checksum."""
    import safetensors.numpy as st

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such packed file; pass the file adjq-export "
                        "--format packed wrote") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the packed file ({err.strerror})") from None
    header = _header(data, path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or "adjq" not in meta:
        raise UserError(f"{path}: a safetensors file without adjq metadata, not a packed "
                        "adjq file; export one with adjq-export --format packed")
    try:
        adjq = json.loads(meta["adjq"])
    except (TypeError, ValueError):
        raise UserError(f"{path}: corrupt packed file (its adjq metadata is not JSON)") from None
    if not isinstance(adjq, dict) or adjq.get("format") != FORMAT:
        raise UserError(f"{path}: not a packed adjq file (format {adjq.get('format')!r}); "
                        "export one with adjq-export --format packed")
    if adjq.get("version") != VERSION:
        raise UserError(f"{path}: packed format version {adjq.get('version')!r} is unknown to "
                        f"this adjq (it reads version {VERSION}); export it again or update adjq")
    try:
        tensors = st.load(data)
    except Exception as err:  # SafetensorError: a truncated or inconsistent buffer
        raise UserError(f"{path}: truncated or corrupt packed file "
                        f"({str(err).splitlines()[0]}); export it again") from None
    if meta.get("checksum") != _checksum(tensors, meta["adjq"]):
        raise UserError(f"{path}: checksum mismatch, the packed file is corrupt; export it "
                        "again")
    return adjq, tensors


def _get(tensors: dict, name: str, path: str, dtype=None, size: int | None = None):
    if name not in tensors:
        raise UserError(f"{path}: tensor {name} is missing; the file does not match its "
                        "network declaration")
    value = tensors[name]
    if size is not None and value.size != size:
        raise UserError(f"{path}: tensor {name} has {value.size} values, its network needs "
                        f"{size}; the file does not match its declaration")
    return value if dtype is None else value.astype(dtype)


def load_packed(path, network=None):
    """The :class:`~adj_quant.qnetwork.QuantizedNetwork` a packed file holds.

    Its fake-quantized weights are bit for bit the exported model's, so are its activation
    grids; its logits are the exported model's. ``network`` (a
    :class:`~adj_quant.network.Network`) refuses a file for another network.
    """
    from adj_quant import nets
    from adj_quant.checkpoints import ModelSpec

    path = os.fspath(path)
    adjq, grouped = read_packed(path)
    tensors = _ungroup(adjq, grouped, path)
    try:
        spec = ModelSpec.from_json(adjq["model"], path)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: its network declaration cannot be read ({err})") from None
    if network is not None and nets.to_json(network) != nets.to_json(spec.arch):
        raise UserError(f"{path} is a packed file for another network ({spec.arch.name}, "
                        f"{spec.arch.num_classes} classes), not {network.name} with "
                        f"{network.num_classes} classes; pass the packed file of this network")
    model = spec.build()
    for scope, layer in model.layers.items():
        _restore_layer(layer, scope, tensors, path)
    for name, quant in model.quantizers().items():
        if not name.endswith(_ACTIVATION_SITES):
            continue
        n = quant.channels
        low = _get(tensors, f"{name}/min", path, np.float32, n)
        width = _get(tensors, f"{name}/width", path, np.float32, n)
        b = _get(tensors, f"{name}/bits", path, np.int64, n)
        if (np.any(b < 2) or np.any(b > 8) or not np.all(np.isfinite(low))
                or not np.all(np.isfinite(width)) or np.any(width < 0)):
            raise UserError(f"{path}: {name} holds bits outside 2..8 or a non-finite range")
        values = range_variables(low, width, b, init_bits=quant.init_bits,
                                 bits_trainable=quant.bits_scale is not None,
                                 alpha=(quant.alpha_lo, quant.alpha_hi), who=f"{path}: {name}")
        for key, value in values.items():
            getattr(quant, key).assign(value)
        got = [v.numpy() for v in quant.adjusted_range()]
        if not (np.array_equal(got[0], low) and np.array_equal(got[1], width)):
            raise UserError(f"{path}: {name} cannot be rebuilt on its range")
    return model


def _set_quantizer(quant, s, z, b, name, path):
    if np.any(b < 2) or np.any(b > 8) or np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise UserError(f"{path}: {name} holds bits outside 2..8 or a non-positive scale")
    if getattr(quant, "symmetric", False):
        values = symmetric_variables(s, z, b, init_bits=quant.init_bits,
                                     bits_trainable=quant.bits_scale is not None,
                                     who=f"{path}: {name}")
    else:
        values = quantizer_variables(s, z, b, init_bits=quant.init_bits,
                                     bits_trainable=quant.bits_scale is not None,
                                     levels=_levels(b), who=f"{path}: {name}")
    for key, value in values.items():
        getattr(quant, key).assign(value)


def _restore_layer(layer, scope, tensors, path):
    axis = _out_axis(layer)
    shape = layer.weights.shape.as_list()
    cout = shape[axis]
    per = int(np.prod(shape)) // cout
    name = f"{scope}/weights"
    if f"{name}/channels" in tensors:
        kept = np.unpackbits(_get(tensors, f"{name}/channels", path, np.uint8,
                                  (cout + 7) // 8))[:cout].astype(bool)
    else:
        kept = np.ones(cout, bool)
    k_n = int(kept.sum())
    s = _get(tensors, f"{name}/scale", path, np.float32, k_n)
    z = _get(tensors, f"{name}/zero_point", path, np.int64, k_n)
    b_all = _get(tensors, f"{name}/bits", path, np.int64, cout)
    b = b_all[kept]
    if f"{name}/mask" in tensors:
        mask_k = np.unpackbits(_get(tensors, f"{name}/mask", path, np.uint8,
                                    (k_n * per + 7) // 8))[:k_n * per].astype(bool)
        mask_k = mask_k.reshape(k_n, per)
    else:
        mask_k = np.ones((k_n, per), bool)
    if (not kept.all() or not mask_k.all()) and layer.mask is None:
        raise UserError(f"{path}: {scope} has removed weights but its network is not pruned; "
                        "the file does not match its declaration")
    widths = np.broadcast_to(b[:, None], mask_k.shape)[mask_k]
    try:
        codes = unpack_codes(_get(tensors, f"{name}/codes", path, np.uint8), widths)
    except ValueError as err:
        raise UserError(f"{path}: {name}/codes: {err}; the file does not match its "
                        "declaration") from None
    grid = np.zeros((k_n, per), np.int64)
    grid[mask_k] = codes
    values = ((grid + z[:, None]).astype(np.float32) / s[:, None]).astype(np.float32)
    values = np.where(mask_k, values, np.float32(0))
    full = np.zeros((cout, per), np.float32)
    full[kept] = values
    mask = np.zeros((cout, per), np.float32)
    mask[kept] = mask_k
    moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
    layer.weights.assign(np.moveaxis(full.reshape(moved), 0, axis))
    if layer.mask is not None:
        layer.mask.assign(np.moveaxis(mask.reshape(moved), 0, axis))
    # The removed channels keep their bits and get the grid s = 1, z = 0 (a symmetric
    # quantizer's z = -n): their weights are masked to 0.
    s_all = np.ones(cout, np.float32)
    z_all = np.zeros(cout, np.int64)
    if getattr(layer.weight_quant, "symmetric", False):
        z_all = 1 - 2 ** (np.clip(b_all, 2, 8) - 1)
    s_all[kept], z_all[kept] = s, z
    _set_quantizer(layer.weight_quant, s_all, z_all, b_all, name, path)
    layer.biases.assign(_get(tensors, f"{scope}/biases", path, np.float32, cout))
    if layer.bias_quant is not None:
        q = layer.bias_quant
        for var in q.trainable_variables + (q.init_min, q.init_max):
            key = var.name.split("/")[-1].split(":")[0]
            var.assign(_get(tensors, f"{scope}/bias_quant/{key}", path, np.float32,
                            int(np.prod(var.shape))).reshape(var.shape))
    got = layer.weight_quant(layer.weights).numpy()
    want = np.moveaxis(full.reshape(moved), 0, axis)
    check = np.moveaxis(mask.reshape(moved), 0, axis) > 0
    if not np.array_equal(got[check], want[check]):
        raise UserError(f"{path}: {scope} weights cannot be rebuilt on their grid")
