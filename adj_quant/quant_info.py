"""``quant_info.json``: the per-channel bit-widths of a quantized network.

The keys follow the network's slim scopes: a layer ``A`` is ``data["A"]``, a layer ``A/B``
is ``data["A"]["B"]``; a sub-layer that most groups have is written as null in a group
without it (EfficientNet's first block has no expand conv). For EfficientNet-B0
(docs/method.md, "quant_info.json"; every ``"act"`` is the bits of that layer's INPUT
activation)::

    "Conv":            {"weight": [32 ints], "act": 8}          # 8 = the 8-bit image
    "expanded_conv":   {"expand": null, "dws": {"weight": [...], "act": [...]},
                        "se_1": {...}, "se_2": {...}, "project": {...}}
    "expanded_conv_1" ... "expanded_conv_15": the same five sub-layers
    "Conv_1":          {"weight": [...], "act": [...]}
    "Logits":          {"weight": [num_classes], "act": [...]}
    "swish_inputs":    {scope: bits or [per-channel bits]} for the input of every swish and,
                       when quantized, of every SE gate's sigmoid ("<block>/se_2")
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

from adj_quant.bits import is_bit_width
from adj_quant.cost import (
    FLOAT_BITS,
    IMAGE_BITS,
    BitAssignment,
    _static,
    counted_bits,
    element_ops,
    network_layers,
)
from adj_quant.errors import UserError
from adj_quant.files import write_json_atomic
from adj_quant.network import Network

SUMMARY_KEYS = ("avg_weight_bits", "avg_act_bits", "params", "ops", "score_adjq",
                "score_micronet", "top1", "top5")
_ARCH_HINT = "was it written for another network or width/depth multiplier?"
_CLASSES_HINT = "was it written for another class count?"


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


def _split(scope: str) -> tuple[str, str | None]:
    group, _, sub = scope.partition("/")
    return group, sub or None


def groups(net: Network) -> dict[str, list[str] | None]:
    """The top-level keys of the file: ``{group: its sub-layer keys}`` (None: a plain layer).

    A group's keys are its own sub-layers plus, as nulls, those that more than half of the
    groups sharing a sub-layer name with it have (EfficientNet's ``expanded_conv`` gets
    ``"expand": null``), in the order the layers run.
    """
    own: dict[str, list[str] | None] = {}
    for scope in net.layer_names:
        group, sub = _split(scope)
        if sub is None:
            own[group] = None
        else:
            own.setdefault(group, []).append(sub)
    result = {}
    for group, subs in own.items():
        if subs is None:
            result[group] = None
            continue
        family = [g for g, s in own.items() if s and set(s) & set(subs)]
        order = []
        for g in family:  # merge the families' sub-layer orders
            for i, sub in enumerate(own[g]):
                if sub not in order:
                    later = [order.index(x) for x in own[g][i + 1:] if x in order]
                    order.insert(min(later) if later else len(order), sub)
        result[group] = [sub for sub in order
                         if sub in subs or 2 * sum(sub in own[g] for g in family) > len(family)]
    return result


def _activation_sites(arch: Network) -> tuple[dict[str, int], set[str]]:
    """Channels of every swish and sigmoid input by the scope that feeds it, and the
    required (swish) ones: a sigmoid site may be absent, meaning float."""
    ops = [op for op in element_ops(arch, 224) if op.kind in ("swish", "sigmoid")]
    return {op.scope: op.channels for op in ops}, {op.scope for op in ops if op.kind == "swish"}


def _sparsity_entry(spec, density) -> dict:
    """``sparsity`` (the fraction of zero weights of each output channel, or one number for
    the layer) and ``removed_channels`` (output channels with no weight left)."""
    d = np.asarray(_static(density), dtype=np.float64)
    if d.ndim == 2:  # [cin, cout]: the kept fraction of each output channel
        d = d.mean(axis=0)
    zeros = np.round(1.0 - d, 6)
    removed = [int(i) for i in np.flatnonzero(d.reshape(-1) == 0)] if d.ndim else []
    sparsity = float(zeros) if d.ndim == 0 else [float(z) for z in zeros]
    return {"sparsity": sparsity, "removed_channels": removed}


def _read_sparsity(entry: dict, spec, source: str):
    """The density of a layer entry's ``sparsity`` / ``removed_channels``, or None (dense)."""
    if "sparsity" not in entry and "removed_channels" not in entry:
        return None
    n = spec.weight_channels
    value = entry.get("sparsity", 0.0)
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
            for v in values):
        raise UserError(f"{source}: {spec.scope} sparsity must be a fraction in [0, 1] or a "
                        f"list of {n} (one per output channel), got {value!r} — {_ARCH_HINT}")
    removed = entry.get("removed_channels", [])
    if not isinstance(removed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in removed):
        raise UserError(f"{source}: {spec.scope} removed_channels must list output channels "
                        f"0..{n - 1}, got {removed!r} — {_ARCH_HINT}")
    density = 1.0 - np.asarray(values, dtype=np.float64)
    density[removed] = 0.0
    if not isinstance(value, list) and not removed:
        return float(density[0])
    return density


def to_quant_info(bits: BitAssignment, arch: Network, summary: dict) -> dict:
    """The ``quant_info.json`` dict of ``bits`` (integers; per-channel lists except a stem's act).

    Swish entries keep their form: a scalar stays one int, a vector becomes a list.
    Missing summary keys are written as null.
    """
    data: dict = {group: (None if subs is None else dict.fromkeys(subs))
                  for group, subs in groups(arch).items()}
    for spec in network_layers(arch, 224):
        entry = {"weight": _as_ints(bits.weight[spec.scope], spec.weight_channels,
                                    f"{spec.scope} weight")}
        if spec.stem:
            entry["act"] = IMAGE_BITS
        else:
            entry["act"] = _as_ints(bits.act[spec.scope], spec.cin, f"{spec.scope} act")
        if spec.scope in bits.density:
            entry.update(_sparsity_entry(spec, bits.density[spec.scope]))
        group, sub = _split(spec.scope)
        if sub is None:
            data[group] = entry
        else:
            data[group][sub] = entry
    channels, required = _activation_sites(arch)
    data["swish_inputs"] = {scope: _swish_entry(bits.swish[scope], n, f"{scope} swish")
                            for scope, n in channels.items()
                            if scope in bits.swish or scope in required}
    bias = _static(bits.bias_bits)
    data["bias_bits"] = None if bias is None or float(bias.reshape(-1)[0]) >= FLOAT_BITS else int(
        np.rint(bias.reshape(-1)[0]))
    summary = dict(summary or {})
    data["summary"] = {key: _plain(summary.get(key)) for key in SUMMARY_KEYS}
    data["summary"].update({k: _plain(v) for k, v in summary.items() if k not in SUMMARY_KEYS})
    return data



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
        if not isinstance(v, int) or not is_bit_width(v, allow_float=True):
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


def from_quant_info(data: dict, arch: Network, source: str = "quant_info.json") -> BitAssignment:
    """Validate ``data`` against ``arch`` and return its :class:`BitAssignment`.

    Raises :class:`UserError` naming the first mismatch (in network order).
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a JSON object — is this a "
                        "quant_info.json?")
    weight, act, density = {}, {}, {}
    layout = groups(arch)
    layers = set(arch.layer_names)
    logits = arch.layer_names[-1]
    for spec in network_layers(arch, 224):
        hint = _CLASSES_HINT if spec.scope == logits else _ARCH_HINT
        group, sub = _split(spec.scope)
        if sub is not None:
            block_entry = _need(data, group, "", source)
            entry = _need(block_entry, sub, f"'{group}'", source)
            for key, value in block_entry.items() if isinstance(block_entry, dict) else ():
                if key not in layout[group]:
                    raise UserError(f"{source}: unexpected key '{key}' in '{group}' — fix the file")
                if value is not None and f"{group}/{key}" not in layers:
                    raise UserError(f"{source}: {group}/{key} is given but the model has no such "
                                    f"layer — {_ARCH_HINT}")
        else:
            entry = _need(data, spec.scope, "", source)
        if entry is None:
            raise UserError(f"{source}: {spec.scope} is null but the model has this layer — {hint}")
        weight[spec.scope] = _check_bits(_need(entry, "weight", f"'{spec.scope}'", source),
                                         spec.scope, "weight", spec.weight_channels, source, hint)
        if isinstance(entry, dict) and (d := _read_sparsity(entry, spec, source)) is not None:
            density[spec.scope] = d
        a = _need(entry, "act", f"'{spec.scope}'", source)
        if spec.stem:
            if a != IMAGE_BITS and a != [IMAGE_BITS] * spec.cin:
                raise UserError(f"{source}: {spec.scope} act is {a!r}; the stem's input is the "
                                f"8-bit image, write 8")
            act[spec.scope] = IMAGE_BITS
        else:
            act[spec.scope] = _check_bits(a, spec.scope, "act", spec.cin, source, _ARCH_HINT)
    channels, required = _activation_sites(arch)
    swish_data = _need(data, "swish_inputs", "", source)
    swish = {}
    for scope, n in channels.items():
        if scope not in required and isinstance(swish_data, dict) and scope not in swish_data:
            continue
        value = _need(swish_data, scope, "'swish_inputs'", source)
        checked = _check_bits(value, scope, "swish input", n, source, _ARCH_HINT)
        swish[scope] = int(checked[0]) if isinstance(value, int) else checked
    extra = sorted(set(swish_data) - set(channels))
    if extra:
        raise UserError(f"{source}: unexpected swish scope '{extra[0]}' in 'swish_inputs' — "
                        f"{_ARCH_HINT}")
    bias = _need(data, "bias_bits", "", source)
    if bias is None:  # float biases, counted at 32 bits
        bias_bits = counted_bits(None)
    elif not isinstance(bias, int) or not is_bit_width(bias, allow_float=True):
        raise UserError(f"{source}: bias_bits is {bias!r}; use an integer in [2, 8] or null "
                        f"for float biases")
    else:
        bias_bits = bias
    known = {"swish_inputs", "bias_bits", "summary", *layout}
    extra = [key for key in data if key not in known]
    if extra:
        raise UserError(f"{source}: unexpected key '{extra[0]}' — {_ARCH_HINT}")
    if "summary" in data and not isinstance(data["summary"], (dict, type(None))):
        raise UserError(f"{source}: 'summary' must be a JSON object — fix the file")
    stems = frozenset(spec.scope for spec in network_layers(arch, 224) if spec.stem)
    return BitAssignment(weight=weight, act=act, swish=swish, bias_bits=bias_bits,
                         image_inputs=stems, density=density)


def load_quant_info(path, arch: Network) -> BitAssignment:
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
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file — pass the quant_info.json written by "
                        "training") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                        f"{err.colno}) — pass the quant_info.json written by training") from None
    return from_quant_info(data, arch, source=path)


def save_quant_info(path, bits: BitAssignment, arch: Network, summary: dict) -> dict:
    """Write ``to_quant_info(...)`` as JSON to ``path``; returns the dict."""
    data = to_quant_info(bits, arch, summary)
    write_json_atomic(path, data, indent=1)
    return data


# --------------------------------------------------------------------------- averages


def average_bits(bits: BitAssignment, arch: Network) -> tuple[float, float]:
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
        if not spec.stem:
            a = _per_channel(bits.act[spec.scope], spec.cin, spec.scope)
            a_sum += float(a.sum())
            a_count += a.size
    return w_sum / w_count, a_sum / a_count
