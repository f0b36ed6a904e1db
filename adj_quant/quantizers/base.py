"""The quantizer contract and the registry of quantizers by name.

A quantizer is a ``tf.Module`` that fake-quantizes one tensor of the quantized network
(:mod:`adj_quant.qnetwork`) per channel. :class:`Quantizer` declares what the rest of adjq
uses of it: the network builds it (:meth:`Quantizer.for_tensor`), calibrates it
(:meth:`~Quantizer.set_range`, :meth:`~Quantizer.init_from_weights`), calls it, trains its
bits (:meth:`~Quantizer.bits_variables`), scores it (:meth:`~Quantizer.bits`, read by
:mod:`adj_quant.cost` through ``QuantizedNetwork.bit_assignment`` and by the validation
report), exports it (:meth:`~Quantizer.adjusted_range`, :mod:`adj_quant.tflite_export`) and
writes its calibrated range to ``initial_thresholds.json`` (``init_min`` / ``init_max``);
checkpoints hold its variables by name.

Quantizers are registered by name (``QuantConfig.quantizer``, ``--quantizer``)::

    @register("mine")
    class MyQuantizer(tf.Module):
        ...   # the members of Quantizer

``names()`` lists them, ``get(name)`` returns the class. The built-in ``"adjq"``
(:class:`adj_quant.quantizers.adjustable.AdjustableQuantizer`) and ``"lsq"``
(:class:`adj_quant.quantizers.lsq.LsqQuantizer`) are listed without importing them (nor
TensorFlow); :func:`get` imports the module that registers one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from adj_quant.errors import UserError

if TYPE_CHECKING:
    import tensorflow as tf


@runtime_checkable
class Quantizer(Protocol):
    """What adjq asks of a quantizer (see the module docstring for who asks what)."""

    #: The quantizer's name prefix: its variables are ``<scope>/<variable>``.
    scope: str
    #: Number of per-channel ranges (1: one range for the whole tensor).
    channels: int
    #: The calibrated per-channel range ``[channels]`` (not trainable; ``thresholds()``).
    init_min: tf.Variable
    init_max: tf.Variable

    @classmethod
    def for_tensor(cls, scope: str, channels: int, *, axis: int, init_bits: int,
                   bits_trainable: bool, signed: bool, live_range: bool, compiled: bool,
                   range_preset_id: int, bits_grad: str, symmetric: bool = False) -> Quantizer:
        """The quantizer of one tensor of the quantized network. ``signed``: a weight or
        bias tensor; ``live_range``: the base range follows the tensor (biases);
        ``compiled``: may run as a per-shape XLA kernel (activations); ``range_preset_id``
        and ``bits_grad``: the adjustable quantizer's settings; ``symmetric``: a symmetric
        grid with zero point 0 (``--symmetric_weights``, weights only; passed only when
        true, so a quantizer without the option needs no such argument). A quantizer
        ignores the options that do not apply to it and refuses those it cannot honour."""

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """The fake-quantized ``x`` (same shape and dtype), differentiable."""

    def bits(self) -> tf.Tensor:
        """The current per-channel bits ``[channels]`` (float, integer-valued)."""

    def bits_variables(self) -> list[tf.Variable]:
        """The variables through which the bits train (empty at fixed bits)."""

    def adjusted_range(self, x: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(L, W)`` per channel: the grid's lowest level and its width; the levels are
        ``L + k W / (2^b - 1)``, ``k = 0 .. 2^b - 1``."""

    def set_range(self, minimum, maximum) -> None:
        """Set the calibrated per-channel range (and whatever the quantizer derives from it)."""

    def init_from_weights(self, weights) -> None:
        """Initialise from the quantized weight tensor itself, after :meth:`set_range` with
        its per-channel min/max (a quantizer that needs nothing more does nothing)."""


#: The built-in quantizers: name -> the module that registers it.
_BUILT_IN = {"adjq": "adj_quant.quantizers.adjustable", "lsq": "adj_quant.quantizers.lsq"}
_REGISTRY: dict[str, type] = {}
#: The members of :class:`Quantizer` that a registered class must define.
_MEMBERS = ("for_tensor", "__call__", "bits", "bits_variables", "adjusted_range", "set_range",
            "init_from_weights")


def _defines(cls: type, member: str) -> bool:
    """Whether ``cls``'s instances have ``member`` as a method (``getattr(cls, "__call__")``
    would find the metaclass's, so the class's own namespaces are searched)."""
    for k in cls.__mro__:
        if member in vars(k):
            v = vars(k)[member]
            return callable(v) or isinstance(v, (classmethod, staticmethod))
    return False


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str):
    """Class decorator: make the quantizer class available as ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise UserError(f"quantizer name {name!r} is not an identifier; use letters, digits "
                        "and underscores, e.g. 'adjq'")

    def decorate(cls: type) -> type:
        missing = [m for m in _MEMBERS if not _defines(cls, m)]
        if missing:
            raise UserError(f"quantizer {name!r} ({cls.__qualname__}) lacks "
                            f"{', '.join(missing)}; define every member of "
                            "adj_quant.quantizers.Quantizer")
        known = _REGISTRY.get(name)
        # The same class registered again (a module reloaded) replaces itself.
        if known is not None and _qualified(known) != _qualified(cls):
            raise UserError(f"quantizer name {name!r} is taken by {_qualified(known)}; "
                            "register another name")
        _REGISTRY[name] = cls
        return cls

    return decorate


def names() -> tuple[str, ...]:
    """Every quantizer name, the built-in ones first (no module is imported)."""
    return tuple(dict.fromkeys([*_BUILT_IN, *_REGISTRY]))


def get(name: str) -> type:
    """The quantizer class registered as ``name``."""
    if name not in _REGISTRY and name in _BUILT_IN:
        importlib.import_module(_BUILT_IN[name])
    if name not in _REGISTRY:
        raise UserError(f"quantizer {name!r}: use one of {', '.join(names())}")
    return _REGISTRY[name]
