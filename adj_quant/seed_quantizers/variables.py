"""Which variables of a checkpoint the seed quantizers quantize: each key is classified as
a trainable weight, an optimizer slot (or moving-average shadow), state (moving statistics,
counters, hyperparameters), non-float or other, from the TF2 object graph when the
checkpoint has one and from the names otherwise (TF1/slim name-based checkpoints)."""

from __future__ import annotations

import re

import numpy as np

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
UINT8_FORMAT_KEY = "_ADJQ_UINT8_FORMAT"
_VARIABLE_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def num_elements(shape):
    return int(np.prod(shape, dtype=np.int64))


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
        elif dtype.name not in FLOAT_DTYPES:
            out[key] = NON_FLOAT
        elif graph is not None and "/.ATTRIBUTES/" in key and not key.endswith(_VARIABLE_VALUE):
            out[key] = OTHER  # e.g. lookup-table contents
        elif num_elements(shape) == 0:
            out[key] = OTHER
        else:
            kind = graph.classify(key, len(shape)) if graph is not None else None
            out[key] = kind or _classify_by_name(key)
    return out
