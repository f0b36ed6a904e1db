"""The network registry: every module of ``slim_nets`` that declares a network.

A network module defines ``NAME`` and ``network(num_classes=..., **params) -> Network``;
adding a file to ``slim_nets/`` is all it takes to make ``build(NAME)`` and
``train.py --model NAME`` know it. A declaration of your own needs no registration: pass
the :class:`~adj_quant.network.Network` itself wherever a network is expected.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from adj_quant.errors import UserError
from adj_quant.network import Network


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    import slim_nets

    found = {}
    for info in pkgutil.iter_modules(slim_nets.__path__):
        module = importlib.import_module(f"slim_nets.{info.name}")
        if hasattr(module, "NAME") and callable(getattr(module, "network", None)):
            found[module.NAME] = module.network
    return found


def names() -> list[str]:
    """The names of the declared networks."""
    return sorted(_registry())


def build(name: str, **params) -> Network:
    """The declaration of network ``name`` (``num_classes`` and its own parameters)."""
    if name not in _registry():
        raise UserError(f"unknown network {name!r}; known networks: {', '.join(names())}")
    try:
        return _registry()[name](**params)
    except TypeError as err:
        raise UserError(f"network {name!r}: {err}") from None


def to_json(net: Network) -> dict:
    """What rebuilds ``net``: its name and parameters."""
    return {"name": net.name, **dict(net.params)}


def from_json(data: dict) -> Network:
    params = dict(data)
    return build(params.pop("name"), **params)
