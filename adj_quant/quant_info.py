"""``quant_info.json``: the per-channel bit-widths of a quantized EfficientNet-B0.

Layout (spec section 7; every ``"act"`` is the bits of that layer's INPUT activation)::

    "Conv":            {"weight": [32 ints], "act": 8}          # 8 = the 8-bit image
    "expanded_conv":   {"expand": null, "dws": {"weight": [...], "act": [...]},
                        "se_1": {...}, "se_2": {...}, "project": {...}}
    "expanded_conv_1" ... "expanded_conv_15": the same five sub-layers
    "Conv_1":          {"weight": [...], "act": [...]}
    "Logits":          {"weight": [num_classes], "act": [...]}
    "swish_inputs":    {swish scope: bits or [per-channel bits]}
    "bias_bits":       int, or null for float biases
    "summary":         {"avg_weight_bits", "avg_act_bits", "params", "ops",
                        "score_adjq", "score_micronet", "top1", "top5"}

Bits are integers in [2, 8]; 32 marks a float (not quantized) tensor and then must fill
the whole tensor.
"""

from __future__ import annotations

import json
import os

import numpy as np

from adj_quant.errors import UserError
from adj_quant.metric import (FLOAT_BITS, IMAGE_BITS, STEM_SCOPE, BitAssignment, _static,
                              element_ops, network_layers)
from slim_nets.efficientnet_b0 import ArchConfig, swish_scopes

SUB_LAYERS = ("expand", "dws", "se_1", "se_2", "project")
SUMMARY_KEYS = ("avg_weight_bits", "avg_act_bits", "params", "ops", "score_adjq",
                "score_micronet", "top1", "top5")
_ARCH_HINT = "was it written for another --width_multiplier/--depth_multiplier?"
_CLASSES_HINT = "was it written for another --num_classes?"


def _per_channel(value, n: int, what: str) -> np.ndarray:
    """Per-channel bits as float64 ``[n]`` (a scalar is expanded to ``n`` channels)."""
    v = _static(value)
    if v is None:
        raise ValueError(f"{what}: bits must be known numbers (eager tensors), not symbolic")
    v = v.reshape(-1)
    if v.size == 1:
        v = np.repeat(v, n)
    if v.size != n:
        raise ValueError(f"{what}: {v.size} bits, expected {n}")
    return v


def _as_ints(value, n: int, what: str) -> list[int]:
    """Per-channel integer bits (rounded to the nearest integer)."""
    return [int(x) for x in np.rint(_per_channel(value, n, what))]


def _swish_entry(value, n: int, what: str):
    v = _static(value)
    if v is not None and v.size == 1:
        return int(np.rint(v.reshape(-1)[0]))
    return _as_ints(value, n, what)


def _plain(value):
    if value is None or isinstance(value, (str, bool, int)):
        return value
    v = _static(value)
    if v is None:
        return value
    return float(v) if v.size == 1 else [float(x) for x in v.reshape(-1)]


def to_quant_info(bits: BitAssignment, arch: ArchConfig, summary: dict) -> dict:
    """The ``quant_info.json`` dict of ``bits`` (integers; per-channel lists except Conv's act).

    Swish entries keep their form: a scalar stays one int, a vector becomes a list.
    Missing summary keys are written as null.
    """
    data: dict = {}
    for spec in network_layers(arch, 224):
        entry = {"weight": _as_ints(bits.weight[spec.scope], spec.weight_channels,
                                    f"{spec.scope} weight")}
        if spec.scope == STEM_SCOPE:
            entry["act"] = IMAGE_BITS
        else:
            entry["act"] = _as_ints(bits.act[spec.scope], spec.cin, f"{spec.scope} act")
        if "/" in spec.scope:
            block, sub = spec.scope.split("/")
            data.setdefault(block, {name: None for name in SUB_LAYERS})[sub] = entry
        else:
            data[spec.scope] = entry
    channels = _swish_channels(arch)
    data["swish_inputs"] = {scope: _swish_entry(bits.swish[scope], channels[scope], f"{scope} swish")
                            for scope in swish_scopes(arch)}
    bias = _static(bits.bias_bits)
    data["bias_bits"] = None if bias is None or float(bias.reshape(-1)[0]) >= FLOAT_BITS else int(
        np.rint(bias.reshape(-1)[0]))
    summary = dict(summary or {})
    data["summary"] = {key: _plain(summary.get(key)) for key in SUMMARY_KEYS}
    data["summary"].update({k: _plain(v) for k, v in summary.items() if k not in SUMMARY_KEYS})
    return data


def _swish_channels(arch: ArchConfig) -> dict[str, int]:
    return {op.scope: op.channels for op in element_ops(arch, 224) if op.kind == "swish"}


# --------------------------------------------------------------------------- reading


def _check_bits(values, scope: str, what: str, n: int, source: str, hint: str) -> np.ndarray:
    if isinstance(values, bool) or not isinstance(values, (int, list)):
        raise UserError(f"{source}: {scope} {what} must be a list of {n} integer bits, "
                        f"got {type(values).__name__}")
    if isinstance(values, int):
        values = [values] * n
    if len(values) != n:
        raise UserError(f"{source}: {scope} {what} has {len(values)} bits, the model needs {n} "
                        f"— {hint}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == FLOAT_BITS):
            raise UserError(f"{source}: {scope} {what} has bits {v!r} at channel {i}; bits must "
                            f"be integers in [2, 8] (32 marks a float tensor) — fix the file")
    if FLOAT_BITS in values and any(v != FLOAT_BITS for v in values):
        raise UserError(f"{source}: {scope} {what} mixes 32 (float) with quantized channels; "
                        f"32 must fill the whole tensor — fix the file")
    return np.asarray(values, dtype=np.int64)


def _need(mapping: dict, key: str, where: str, source: str):
    if not isinstance(mapping, dict):
        raise UserError(f"{source}: {where} must be a JSON object — fix the file")
    if key not in mapping:
        raise UserError(f"{source}: missing key '{key}'{' in ' + where if where else ''} — "
                        f"is this a quant_info.json written by adjq training?")
    return mapping[key]


def from_quant_info(data: dict, arch: ArchConfig, source: str = "quant_info.json") -> BitAssignment:
    """Validate ``data`` against ``arch`` and return its :class:`BitAssignment`.

    Raises :class:`UserError` naming the first mismatch (in network order).
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a JSON object — is this a quant_info.json?")
    weight, act = {}, {}
    blocks = {b.scope: b for b in arch.blocks()}
    for spec in network_layers(arch, 224):
        hint = _CLASSES_HINT if spec.scope == "Logits" else _ARCH_HINT
        if "/" in spec.scope:
            block, sub = spec.scope.split("/")
            block_entry = _need(data, block, "", source)
            entry = _need(block_entry, sub, f"'{block}'", source)
            if sub == "dws" and not blocks[block].has_expand:
                if block_entry.get("expand") is not None:
                    raise UserError(f"{source}: {block}/expand is given but this block has no "
                                    f"expand conv — {_ARCH_HINT}")
            extra = sorted(set(block_entry) - set(SUB_LAYERS))
            if extra:
                raise UserError(f"{source}: unexpected key '{extra[0]}' in '{block}' — fix the file")
        else:
            entry = _need(data, spec.scope, "", source)
        if entry is None:
            raise UserError(f"{source}: {spec.scope} is null but the model has this layer — {hint}")
        weight[spec.scope] = _check_bits(_need(entry, "weight", f"'{spec.scope}'", source),
                                         spec.scope, "weight", spec.weight_channels, source, hint)
        a = _need(entry, "act", f"'{spec.scope}'", source)
        if spec.scope == STEM_SCOPE:
            if a != IMAGE_BITS and a != [IMAGE_BITS] * spec.cin:
                raise UserError(f"{source}: Conv act is {a!r}; the stem's input is the 8-bit "
                                f"image, write 8")
            act[spec.scope] = IMAGE_BITS
        else:
            act[spec.scope] = _check_bits(a, spec.scope, "act", spec.cin, source, _ARCH_HINT)
    channels = _swish_channels(arch)
    swish_data = _need(data, "swish_inputs", "", source)
    swish = {}
    for scope, n in channels.items():
        value = _need(swish_data, scope, "'swish_inputs'", source)
        checked = _check_bits(value, scope, "swish input", n, source, _ARCH_HINT)
        swish[scope] = int(checked[0]) if isinstance(value, int) else checked
    extra = sorted(set(swish_data) - set(channels))
    if extra:
        raise UserError(f"{source}: unexpected swish scope '{extra[0]}' in 'swish_inputs' — "
                        f"{_ARCH_HINT}")
    bias = _need(data, "bias_bits", "", source)
    if bias is None:
        bias_bits = FLOAT_BITS
    elif isinstance(bias, bool) or not isinstance(bias, int) or not (
            2 <= bias <= 8 or bias == FLOAT_BITS):
        raise UserError(f"{source}: bias_bits is {bias!r}; use an integer in [2, 8] or null "
                        f"for float biases")
    else:
        bias_bits = bias
    known = {STEM_SCOPE, "Conv_1", "Logits", "swish_inputs", "bias_bits", "summary", *blocks}
    extra = [key for key in data if key not in known]
    if extra:
        raise UserError(f"{source}: unexpected key '{extra[0]}' — {_ARCH_HINT}")
    if "summary" in data and not isinstance(data["summary"], (dict, type(None))):
        raise UserError(f"{source}: 'summary' must be a JSON object — fix the file")
    return BitAssignment(weight=weight, act=act, swish=swish, bias_bits=bias_bits)


def load_quant_info(path, arch: ArchConfig) -> BitAssignment:
    """Read and validate a ``quant_info.json`` file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file — pass the quant_info.json written by training") \
            from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}) — pass a readable "
                        f"quant_info.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                        f"{err.colno}) — pass the quant_info.json written by training") from None
    return from_quant_info(data, arch, source=path)


def save_quant_info(path, bits: BitAssignment, arch: ArchConfig, summary: dict) -> dict:
    """Write ``to_quant_info(...)`` as JSON to ``path``; returns the dict."""
    data = to_quant_info(bits, arch, summary)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data


# --------------------------------------------------------------------------- averages


def average_bits(bits: BitAssignment, arch: ArchConfig) -> tuple[float, float]:
    """``(avg_weight_bits, avg_act_bits)``.

    * weights: parameter-weighted, i.e. the mean over every weight element of all conv /
      depthwise / SE / FC layers (the stem included) of that element's bits; biases are
      not included;
    * activations: the mean over the input-activation channels of every quantized layer,
      the stem's 8-bit image excluded (each input channel counts once per layer).

    Float (32-bit) tensors count at 32.
    """
    w_sum = w_count = a_sum = a_count = 0.0
    for spec in network_layers(arch, 224):
        w = _per_channel(bits.weight[spec.scope], spec.weight_channels, spec.scope)
        per_channel = spec.weights_per_out_channel
        w_sum += per_channel * float(w.sum())
        w_count += per_channel * w.size
        if spec.scope != STEM_SCOPE:
            a = _per_channel(bits.act[spec.scope], spec.cin, spec.scope)
            a_sum += float(a.sum())
            a_count += a.size
    return w_sum / w_count, a_sum / a_count
