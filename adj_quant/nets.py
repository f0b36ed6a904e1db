"""The network registry: every module of ``slim_nets`` that declares a network.

A network module defines ``NAME`` and ``network(num_classes=..., **params) -> Network``
(or ``NETWORKS = {name: function}`` for several variants); adding a file to ``slim_nets/``
is all it takes to make ``build(NAME)`` and ``train.py --model NAME`` know it. A
declaration of your own needs no registration: pass the :class:`~adj_quant.network.Network`
itself wherever a network is expected; :func:`to_json` then stores the whole declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil

from adj_quant.errors import UserError
from adj_quant.network import Network, Node


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    import slim_nets

    found = {}
    for info in pkgutil.iter_modules(slim_nets.__path__):
        module = importlib.import_module(f"slim_nets.{info.name}")
        if hasattr(module, "NAME") and callable(getattr(module, "network", None)):
            found[module.NAME] = module.network
        found.update(getattr(module, "NETWORKS", {}))
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
    """What rebuilds ``net``: its name and parameters for a registered network, else the
    whole declaration (an imported or hand-written network)."""
    if net.name in _registry():
        try:
            if build(net.name, **dict(net.params)) == net:
                return {"name": net.name, **dict(net.params)}
        except (UserError, ValueError):
            pass
    return {"name": net.name, "scope": net.scope, "params": [list(p) for p in net.params],
            "input_mean": list(net.input_mean), "input_std": list(net.input_std),
            "bn_epsilon": net.bn_epsilon,
            "nodes": [_node_json(node) for node in net.nodes]}


_DEFAULT_NODE = Node("", "act")


def _node_json(node: Node) -> dict:
    """The fields of ``node`` that differ from the defaults."""
    data = {"name": node.name, "op": node.op}
    for field in dataclasses.fields(Node)[2:]:
        value = getattr(node, field.name)
        if value != getattr(_DEFAULT_NODE, field.name):
            data[field.name] = list(value) if isinstance(value, tuple) else value
    return data


def from_json(data: dict) -> Network:
    params = dict(data)
    if "nodes" not in params:
        return build(params.pop("name"), **params)
    try:
        nodes = tuple(Node(**{k: tuple(v) if isinstance(v, list) else v for k, v in n.items()})
                      for n in params["nodes"])
        return Network(params["name"], params["scope"], nodes,
                       tuple(tuple(p) for p in params.get("params", ())),
                       tuple(params["input_mean"]), tuple(params["input_std"]),
                       float(params["bn_epsilon"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"network declaration {params.get('name')!r} cannot be read: "
                        f"{err}") from None


def from_keras(model, **options):
    """A float Keras 3 functional model as ``(Network, {slim variable name: array})``: see
    :func:`adj_quant.keras_import.from_keras`."""
    from adj_quant.keras_import import from_keras as convert

    return convert(model, **options)
