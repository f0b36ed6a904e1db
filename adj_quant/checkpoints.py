"""Checkpoints: atomic writes, a best-checkpoint pointer, and models rebuilt from them.

Every stage directory holds ``tf.train.Checkpoint`` files, a ``checkpoint`` state file
(so ``tf.train.latest_checkpoint`` works), ``checkpoints.json`` (every checkpoint with its
metrics, the latest and the best) and ``model_spec.json`` (what model the checkpoints
hold: float or quantized, architecture, quantization settings).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from adj_quant import nets
from adj_quant.checkpoint_paths import (  # noqa: F401  (re-exported)
    CorruptCheckpoint,
    reading,
    resolve_checkpoint,
)
from adj_quant.errors import UserError
from adj_quant.files import write_atomic, write_json_atomic
from adj_quant.network import FloatNetwork, Network
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

STATE_FILE = "checkpoints.json"
SPEC_FILE = "model_spec.json"


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- model specs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str                      # "float" | "quant"
    arch: Network
    quant: QuantConfig | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "network": nets.to_json(self.arch),
                "quant": dataclasses.asdict(self.quant) if self.quant else None}

    @classmethod
    def from_json(cls, data: dict, source: str = SPEC_FILE) -> "ModelSpec":
        quant = None
        if data.get("quant"):
            saved = data["quant"]
            missing = {k: v for k, v in QuantConfig.LEGACY.items() if k not in saved}
            if missing:
                print(f"note: {source} predates {', '.join(missing)}; the model is rebuilt as it "
                      f"was trained ({', '.join(f'{k}={v}' for k, v in missing.items())})",
                      file=sys.stderr)
            quant = QuantConfig(**{**missing, **saved})
        if "network" in data:
            net = nets.from_json(data["network"])
        else:  # written before networks were declared: always EfficientNet-B0
            net = nets.build("efficientnet_b0", **data["arch"])
        return cls(data["kind"], net, quant)

    def build(self, seed: int = 0, dropout_rate: float = 0.2, drop_connect_rate: float = 0.2,
              bn_momentum: float = 0.99, sync_bn: bool = False):
        if self.kind == "float":
            return FloatNetwork(self.arch, dropout_rate=dropout_rate,
                                drop_connect_rate=drop_connect_rate, seed=seed,
                                bn_momentum=bn_momentum, sync_bn=sync_bn)
        return QuantizedNetwork(self.arch, self.quant, dropout_rate=dropout_rate,
                                drop_connect_rate=drop_connect_rate, seed=seed)


def save_spec(directory: str, spec: ModelSpec) -> None:
    write_json_atomic(os.path.join(directory, SPEC_FILE), spec.to_json())


def load_spec(ckpt_path: str) -> ModelSpec | None:
    path = os.path.join(os.path.dirname(ckpt_path), SPEC_FILE)
    if not os.path.exists(path):
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict) or "kind" not in data:
            raise ValueError("not a model spec")
        return ModelSpec.from_json(data, path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is unreadable ({err}); it says which model the checkpoints "
                        "beside it hold: restore it from the run that wrote them") from None


# --------------------------------------------------------------------------- run checkpoints

#: The key under which a ``tf.train.Checkpoint`` file holds its object graph.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class CheckpointWriter:
    """What ``checkpoint.write(prefix)`` writes (:meth:`prepare`), walking the objects once.

    An eager ``tf.train.Checkpoint.write`` walks every object reachable from the checkpoint
    at every call: about a second of Python per checkpoint for a quantized EfficientNet-B0
    with its optimizer slots (~4,400 objects), each mini-epoch. This writer writes the first
    checkpoint with ``write``, then reads back from that file which key holds which variable
    (the object graph stored in it, followed from the root with ``tf.train.TrackableView``),
    and writes every later checkpoint as one ``SaveV2`` of the variables' current values
    and the same object graph: the keys and values ``write`` would write
    (``tests/test_checkpoints.py`` compares them). The objects must not change after the
    first write (the trainer creates every variable before it). A checkpoint that holds
    anything but plain variables (distributed variables, whose reads take every worker;
    iterators; Python state) is written with ``write`` every time.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint):
        self.checkpoint = checkpoint
        self._plan = None        # (sorted keys, their variables, the object graph)
        self._read_back = False  # the first file has been read back (self._plan set or not)

    def prepare(self, prefix: str) -> Callable[[], None]:
        """Take the checkpoint's values now; returns the function that writes them to
        ``prefix``, which may run in another thread while training goes on (the values
        read are tensors that later updates of the variables do not change). A checkpoint
        written with ``write`` (the first, and any that is not only plain variables) is
        written here, and the function does nothing."""
        if self._plan is None:
            self.checkpoint.write(prefix)
            if not self._read_back:
                self._plan, self._read_back = variables_by_key(self.checkpoint, prefix), True
            return lambda: None
        keys, variables, graph = self._plan
        values = [read_plain(v) for v in variables]

        def write() -> None:
            with tf.device("CPU:0"):  # a CPU kernel only; values on a GPU are copied
                tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys + [OBJECT_GRAPH_KEY],
                                  shape_and_slices=[""] * (len(keys) + 1),
                                  tensors=values + [graph])

        return write


def variables_by_key(checkpoint, prefix: str):
    """``(keys, variables, object graph)`` of the file ``checkpoint.write`` wrote at
    ``prefix``: every key but the object graph's, sorted, with the variable it holds; None
    if an entry is not a plain variable's value."""
    reader = tf.train.load_checkpoint(prefix)
    graph_bytes = reader.get_tensor(OBJECT_GRAPH_KEY)
    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(graph_bytes)
    objects, queue, found = {0: checkpoint}, collections.deque([0]), {}
    while queue:
        node_id = queue.popleft()
        node, obj = graph.nodes[node_id], objects[node_id]
        if node.slot_variables or node.registered_saver.name:
            return None
        plain = isinstance(obj, tf.Variable) and not isinstance(
            obj, tf.distribute.DistributedValues)
        for attribute in node.attributes:
            if attribute.name != "VARIABLE_VALUE" or not plain:
                return None
            found[attribute.checkpoint_key] = obj
        children = tf.train.TrackableView.children(obj)
        for ref in node.children:
            if ref.node_id not in objects:
                if ref.local_name not in children:
                    return None
                objects[ref.node_id] = children[ref.local_name]
                queue.append(ref.node_id)
    shapes = reader.get_variable_to_shape_map()
    if set(found) != set(shapes) - {OBJECT_GRAPH_KEY}:
        return None
    keys = sorted(found)
    return keys, [found[k] for k in keys], tf.constant(graph_bytes, tf.string)



class RunCheckpoints:
    """The checkpoints of one stage directory."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = keep
        self._writer = None   # the CheckpointWriter of the last checkpoint object saved
        self._pending = None  # (future, state before it) of a save still being written
        self._thread = None   # the one thread that writes in the background
        os.makedirs(directory, exist_ok=True)
        self.state_path = os.path.join(directory, STATE_FILE)
        self.state = {"checkpoints": [], "latest": None, "best": None, "finished": False}
        if os.path.exists(self.state_path):
            try:
                self.state = read_json(self.state_path)
                if not isinstance(self.state.get("checkpoints"), list):
                    raise ValueError("no list of checkpoints")
            except (OSError, ValueError, AttributeError) as err:
                raise UserError(f"{self.state_path} is unreadable ({err}); restore it, or use "
                                "another --run_dir") from None

    @property
    def finished(self) -> bool:
        return bool(self.state.get("finished"))

    def path(self, name: str | None) -> str | None:
        return None if name is None else os.path.join(self.directory, name)

    def latest(self) -> str | None:
        return self.path(self.state["latest"])

    def best(self) -> str | None:
        return self.path(self.state["best"])

    def entries(self) -> list[dict]:
        return list(self.state["checkpoints"])

    def save(self, checkpoint: tf.train.Checkpoint, name: str, info: dict,
             best_key=None, background: bool = False) -> str:
        """Write ``checkpoint`` as ``name`` atomically and update the pointers.

        ``best_key(entry)`` ranks entries; the highest is the best (default: top-1).
        Saving the same checkpoint object again is fast (:class:`CheckpointWriter`).

        ``background``: the values are taken now, and the files, the pruning of old
        checkpoints and ``checkpoints.json`` are written by a thread while the caller goes
        on. The pointers here move at once; those on disk only once the files are complete,
        so a crash in between leaves the previous checkpoint as the latest. The next call
        of any method that writes (and :meth:`wait`) waits for it first; if the write
        failed, it raises that error and the pointers return to where they were.
        """
        self.wait()
        write = self._prepare_files(checkpoint, name)
        before = copy.deepcopy(self.state)
        entry = dict(info, name=name)
        self.state["checkpoints"] = [e for e in self.state["checkpoints"] if e["name"] != name]
        self.state["checkpoints"].append(entry)
        self.state["latest"] = name
        key = best_key or (lambda e: e.get("top1", 0.0))
        self.state["best"] = max(self.state["checkpoints"], key=key)["name"]
        pruned = self._prune()
        state = copy.deepcopy(self.state)

        def finish() -> None:
            write()
            for old in pruned:
                self._remove_files(old)
            self._write_state(state)

        if not background:
            try:
                finish()
            except BaseException:
                self.state = before
                raise
        else:
            if self._thread is None:
                self._thread = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="adjq-checkpoints")
            self._pending = (self._thread.submit(finish), before)
        return os.path.join(self.directory, name)

    def wait(self) -> None:
        """Wait for a save running in the background (see :meth:`save`); raise its error."""
        if self._pending is None:
            return
        (future, before), self._pending = self._pending, None
        try:
            future.result()
        except BaseException:
            self.state = before
            raise

    def _prepare_files(self, checkpoint: tf.train.Checkpoint, name: str) -> Callable[[], None]:
        """Take the checkpoint's values; returns the function that writes them under
        ``name`` atomically (data first, index last: a prefix with an .index file is
        always complete)."""
        tmp_prefix = os.path.join(self.directory, f".tmp-{name}")
        final = os.path.join(self.directory, name)
        for stale in glob.glob(tmp_prefix + ".*"):
            os.remove(stale)
        if self._writer is None or self._writer.checkpoint is not checkpoint:
            self._writer = CheckpointWriter(checkpoint)

        def remove_tmp():
            for path in glob.glob(tmp_prefix + "*"):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

        try:
            write = self._writer.prepare(tmp_prefix)
        except BaseException:
            remove_tmp()
            raise

        def write_and_move() -> None:
            try:
                write()
            except BaseException:
                remove_tmp()
                raise
            files = sorted(glob.glob(tmp_prefix + ".*"), key=lambda p: p.endswith(".index"))
            for path in files:
                os.replace(path, final + path[len(tmp_prefix):])

        return write_and_move

    def _prune(self) -> list[str]:
        """Keep the best checkpoint and the ``keep`` most recent ones; returns the names of
        the others, whose files are to be removed."""
        if self.keep <= 0:
            return []
        entries = self.state["checkpoints"]
        kept = {e["name"] for e in entries[-self.keep:]} | {self.state["best"]}
        self.state["checkpoints"] = [e for e in entries if e["name"] in kept]
        return [e["name"] for e in entries if e["name"] not in kept]

    def _remove_files(self, name: str) -> None:
        for path in glob.glob(os.path.join(self.directory, name) + ".*"):
            os.remove(path)

    def discard(self, name: str, best_key=None) -> None:
        """Forget checkpoint ``name`` (found damaged); its files stay where they are."""
        self.wait()
        self.state["checkpoints"] = [e for e in self.state["checkpoints"] if e["name"] != name]
        remaining = self.state["checkpoints"]
        self.state["latest"] = remaining[-1]["name"] if remaining else None
        if self.state["best"] == name:
            key = best_key or (lambda e: e.get("top1", 0.0))
            self.state["best"] = max(remaining, key=key)["name"] if remaining else None
        self._write_state()

    def set_best(self, name: str) -> None:
        self.wait()
        self.state["best"] = name
        self._write_state()

    def mark_finished(self, **extra) -> None:
        self.wait()
        self.state["finished"] = True
        self.state.update(extra)
        self._write_state()

    def _write_state(self, state: dict | None = None) -> None:
        state = self.state if state is None else state
        write_json_atomic(self.state_path, state)
        latest = state["latest"]
        lines = [f'model_checkpoint_path: "{latest}"'] * (latest is not None) + [
            f'all_model_checkpoint_paths: "{e["name"]}"' for e in state["checkpoints"]]
        write_atomic(os.path.join(self.directory, "checkpoint"), "\n".join(lines) + "\n")


class WorkerCheckpoints(RunCheckpoints):
    """What a multi-worker run's non-chief worker sees of a stage directory.

    It reads the chief's ``checkpoints.json`` (to resume where the chief resumes) and
    keeps the same bookkeeping in memory, but writes nothing there: saving a checkpoint
    takes every worker (distributed variables are read collectively), so it writes to a
    temporary directory of its own and deletes it, as TensorFlow's multi-worker guide
    prescribes.
    """

    def __init__(self, directory: str, keep: int = 3, worker: str = "worker"):
        self.directory, self.keep, self.worker = directory, keep, worker
        self._pending = self._thread = None
        self.state_path = os.path.join(directory, STATE_FILE)
        self.state = {"checkpoints": [], "latest": None, "best": None, "finished": False}
        if os.path.exists(self.state_path):
            self.state = read_json(self.state_path)

    def _prepare_files(self, checkpoint: tf.train.Checkpoint, name: str) -> Callable[[], None]:
        temp = tempfile.mkdtemp(prefix=f"adjq-{self.worker}-")
        try:
            checkpoint.write(os.path.join(temp, name))
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return lambda: None

    def _remove_files(self, name: str) -> None:
        pass

    def _write_state(self, state: dict | None = None) -> None:
        pass


def remove_orphans(directory: str) -> list[str]:
    """Delete what an interrupted save left in a stage directory: ``.tmp-*`` checkpoint files,
    the ``.tmp-*_temp/`` folders TensorFlow writes shards into, temporary state files. Only
    the process that holds the directory (its lock) may call this."""
    removed = []
    for path in glob.glob(os.path.join(directory, ".tmp-*")) + glob.glob(
            os.path.join(directory, ".*.tmp")):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------- restoring


def _variable_shapes(ckpt_path: str) -> dict[str, list[int]]:
    return {name: shape for name, shape in tf.train.list_variables(ckpt_path)}


def restore_model(model: tf.Module, ckpt_path: str, what: str = "--ckpt_path",
                  allow_missing: tuple[str, ...] = ("bits_scale", "/mask",
                                                    "/prune_threshold")) -> None:
    """Restore ``model``'s variables from a checkpoint written with ``Checkpoint(model=...)``.

    Shapes are checked first, so a checkpoint of another architecture or class count is
    refused with the first mismatch named. Variables whose names end with one of
    ``allow_missing`` may be absent and keep their initial values: a fixed-bit checkpoint
    into a trainable-bit model, a dense one into a model that prunes (masks of ones,
    thresholds of 0: every weight kept).
    """
    with reading(ckpt_path):
        saved = _variable_shapes(ckpt_path)
        verify_checksums(ckpt_path)
    wanted = checkpoint_keys(model)
    for key, var in wanted.items():
        if key not in saved:
            if var.name.split(":")[0].endswith(allow_missing):
                continue
            raise UserError(f"{what} {ckpt_path} does not match the model: it has no "
                            f"{var.name.split(':')[0]} (is it a float/quantized checkpoint of "
                            "another stage, or another swish_bits/bias_bits setting?)")
        if list(saved[key]) != list(var.shape):
            raise UserError(f"{what} {ckpt_path} does not match the model: "
                            f"{var.name.split(':')[0]} has shape {list(saved[key])} in the "
                            f"checkpoint but {var.shape.as_list()} in the model (another "
                            "class count or width/depth?)")
    with reading(ckpt_path):
        tf.train.Checkpoint(model=model).read(ckpt_path).expect_partial()
    if not all_finite(model.variables):
        raise CorruptCheckpoint(ckpt_path, "it holds NaN or Inf values")


def verify_checksums(ckpt_path: str) -> None:
    """Read every tensor of a checkpoint once, so that TensorFlow checks each one's checksum:
    a damaged file is refused even where the damage lies in tensors the caller does not
    restore (optimizer slots). One tensor is held at a time."""
    reader = tf.train.load_checkpoint(ckpt_path)
    for key in reader.get_variable_to_shape_map():
        reader.get_tensor(key)


def read_plain(v: tf.Variable) -> tf.Tensor:
    """A plain (not distributed) variable's value with one ``ReadVariableOp`` (``read_value``
    adds an Identity: twice the eager calls)."""
    return tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)


def all_finite(variables) -> bool:
    """Whether every element of every floating variable is finite.

    A plain variable is read with one ``ReadVariableOp`` and checked in NumPy: a third of
    the time of a TensorFlow reduction per variable (two ops and a read back) for the
    ~1,600 variables of a quantized EfficientNet-B0, which training checks after every
    mini-epoch. A distributed variable is reduced by TensorFlow on its own device."""
    for v in variables:
        if not v.dtype.is_floating:
            continue
        if isinstance(v, tf.distribute.DistributedValues) or not isinstance(v, tf.Variable):
            finite = bool(tf.reduce_all(tf.math.is_finite(v)))
        else:
            finite = np.isfinite(read_plain(v).numpy()).all()
        if not finite:
            return False
    return True


def checkpoint_keys(model: tf.Module) -> dict[str, tf.Variable]:
    """Checkpoint key of every variable of ``model`` under ``Checkpoint(model=model)``."""
    keys = {}
    seen = set()

    def walk(obj, path):
        if isinstance(obj, tf.Variable):
            if id(obj) not in seen:
                seen.add(id(obj))
                keys["/".join(path) + "/.ATTRIBUTES/VARIABLE_VALUE"] = obj
            return
        if isinstance(obj, tf.random.Generator):
            walk(obj._state_var, path + ["_state_var"])  # noqa: SLF001 (its checkpoint name)
            return
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        elif isinstance(obj, tf.Module):
            items = ((k, v) for k, v in vars(obj).items() if not k.startswith("_"))
        else:
            return
        for key, value in items:
            walk(value, path + [_escape(str(key))])

    walk(model, ["model"])
    return keys


def _escape(name: str) -> str:
    # Object-graph checkpoint keys escape "/" and "." in attribute names.
    return name.replace(".", "..").replace("/", ".S")


def model_spec_for(ckpt_path: str, fallback: ModelSpec | None, what: str) -> ModelSpec:
    spec = load_spec(ckpt_path)
    if spec is not None:
        return spec
    if fallback is None:
        raise UserError(f"{what} {ckpt_path}: no {SPEC_FILE} beside it; pass the model flags")
    return fallback
