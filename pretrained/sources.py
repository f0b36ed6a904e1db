"""Reading public float weights: Keras applications files, TPU EfficientNet and slim checkpoints.

:func:`open_source` turns what a user passes into a :class:`Source`: the format, the declared
network the weights fit (``model``), the class count, and :meth:`Source.tensor`, which gives
the value of one of our slim variables (``efficientnet_b0/expanded_conv_3/dws/...``) together
with the name it has in the source, so that errors name the source's own variable.

Three layouts are known:

``keras``
    ``keras.applications`` weights: ``.weights.h5`` (Keras 3), legacy ``.h5`` (the files the
    Keras applications download) or a whole ``.keras`` model. EfficientNetB0, MobileNetV2
    (alpha 1.0 and 1.4) and ResNet50. The family is recognised from the weight shapes (16
    depthwise convolutions: EfficientNetB0; 17: MobileNetV2, alpha from the stem width; none
    and a 7x7 stem: ResNet50), the class count from the classifier; the Keras model is then
    built with ``weights=None`` and loads the file itself, and its layers are read by name.
``tpu``
    The official TPU EfficientNet checkpoints (``efficientnet-b0/stem/conv2d/kernel``, ...).
``slim``
    TF1 name-based checkpoints with our own variable names: slim's ``MobilenetV2`` and
    ``resnet_v1_50`` checkpoints (and name-based ``efficientnet_b0`` ones).

TensorFlow checkpoints may hold ``<name>/ExponentialMovingAverage`` shadow variables; where one
exists it is used instead of the raw value (publishers measure their accuracy with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tarfile
import tempfile
import warnings

import numpy as np

from adj_quant import nets
from adj_quant.errors import UserError

EMA_SUFFIX = "/ExponentialMovingAverage"
KERAS_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

#: The declared networks public weights convert into, and where the weights come from.
CONVERTIBLE = {
    "efficientnet_b0": "Keras EfficientNetB0 weights or a TPU efficientnet-b0 checkpoint",
    "mobilenet_v2": "Keras MobileNetV2 (alpha 1.0) weights or slim's mobilenet_v2_1.0_224",
    "mobilenet_v2_140": "Keras MobileNetV2 (alpha 1.4) weights or slim's mobilenet_v2_1.4_224",
    "resnet_v1_50": "slim's resnet_v1_50 checkpoint",
    "resnet_v1_50_keras": "Keras ResNet50 weights",
}

# The ImageNet normalisation EfficientNet was trained with (efficientnet_builder.py:
# MEAN_RGB / STDDEV_RGB, on 0..1 here).
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@dataclasses.dataclass
class Source:
    """Weights opened for conversion (see the module docstring)."""

    path: str
    format: str                  # "keras" | "tpu" | "slim"
    model: str                   # the declared network the weights fit
    num_classes: int             # classes in the source (before --labels_offset)
    description: str             # "Keras EfficientNetB0 weights", ...
    lookup: object               # slim name -> (array, source name), or None
    notes: list[str] = dataclasses.field(default_factory=list)
    ema_used: int = 0

    def tensor(self, slim_name: str) -> tuple[np.ndarray, str]:
        found = self.lookup(slim_name)
        if found is None:
            raise UserError(f"SOURCE {self.path} has no variable for {slim_name}: it holds "
                            f"{self.description}, which convert to {self.model}")
        return found


def _reason(err: BaseException) -> str:
    """An exception as a short phrase on one line."""
    text = " ".join(str(err).split())
    return (text[:160] + "...") if len(text) > 160 else (text or type(err).__name__)


# --------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def open_source(path: str, model: str | None = None):
    """The :class:`Source` at ``path`` (a Keras file, a checkpoint prefix or file, a directory
    holding one checkpoint, or the publisher's ``.tar.gz``). ``model`` is the network the
    caller asks for (None: the one the source holds); it only picks between candidates that
    share variable names. Temporary files (an unpacked tarball) live as long as the context."""
    path = os.fspath(path)
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise UserError(f"SOURCE {path} does not exist; pass a Keras weights file, a checkpoint "
                        "prefix, a directory holding one checkpoint, or the downloaded tarball")
    if os.path.isfile(path) and path.endswith(TAR_SUFFIXES):
        with _unpacked(path) as directory:
            yield _open_path(directory, model, shown=path)
        return
    yield _open_path(path, model, shown=path)


def _open_path(path: str, model: str | None, shown: str) -> Source:
    if os.path.isfile(path) and path.lower().endswith(KERAS_SUFFIXES):
        return _keras_source(path, model)
    kind, target = _checkpoint_prefix(path, shown)
    if kind == "keras":
        return _keras_source(target, model)
    return _checkpoint_source(target, model, shown)


@contextlib.contextmanager
def _unpacked(path: str):
    """The checkpoint and Keras files of a tarball, unpacked into a temporary directory."""
    wanted = re.compile(r"(\.index|\.data-\d+-of-\d+|\.ckpt|/checkpoint|^checkpoint|"
                        r"\.weights\.h5|\.h5|\.keras)$")
    tmp = tempfile.mkdtemp(prefix="adjq-pretrained-")
    try:
        try:
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and wanted.search(m.name)]
                if not members:
                    raise UserError(f"SOURCE {path} holds no checkpoint or Keras weights file")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"SOURCE {path} is not a readable tarball ({_reason(err)}); "
                            "download it again, or unpack it and pass the checkpoint") from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- TF checkpoints


def _checkpoint_prefix(path: str, shown: str) -> tuple[str, str]:
    """``("ckpt", prefix)``: the checkpoint prefix (``.index``/``.data``) or V1 file that
    ``path`` means, or ``("keras", file)``: the one Keras weights file of a directory."""
    match = re.match(r"^(.*)\.(index|data-\d+-of-\d+)$", path)
    if match and os.path.exists(match.group(1) + ".index"):
        return "ckpt", match.group(1)
    if not os.path.isdir(path):
        return "ckpt", path  # a prefix, or a file: a V1 checkpoint (slim's 2016 .ckpt files)
    if os.path.exists(os.path.join(path, "model_spec.json")):
        raise UserError(f"SOURCE {shown} is already an adjq checkpoint directory; pass it to "
                        "--ckpt_path directly, there is nothing to convert")
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            if name.endswith(KERAS_SUFFIXES):
                found.append(("keras", os.path.join(root, name)))
        indexes = sorted(f for f in files if f.endswith(".index"))
        found += [("v2", os.path.join(root, f[: -len(".index")])) for f in indexes]
        v1 = sorted(f for f in files if f.endswith(".ckpt"))
        found += [("v1", os.path.join(root, f)) for f in v1]
    if len(found) > 1:  # a training directory: the checkpoint its state file names
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(path)
        if latest and os.path.exists(latest + ".index"):
            found = [("v2", latest)]
    if len(found) == 1:
        kind, target = found[0]
        return ("keras" if kind == "keras" else "ckpt"), target
    if not found:
        raise UserError(f"SOURCE {shown}: no checkpoint (.index or .ckpt) or Keras weights file "
                        "in this directory")
    names = ", ".join(os.path.relpath(p, path) for _, p in found[:4])
    raise UserError(f"SOURCE {shown} holds {len(found)} checkpoints or weight files ({names}); "
                    "pass the one to convert")


def _read_checkpoint(prefix: str, shown: str):
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as err:
        raise UserError(f"SOURCE {shown} is not a readable Keras weights file or TensorFlow "
                        f"checkpoint ({_reason(err)})") from None
    return reader, {name: list(shape) for name, shape in shapes.items()}


def _checkpoint_source(prefix: str, model: str | None, shown: str) -> Source:
    reader, shapes = _read_checkpoint(prefix, shown)
    tops = sorted({name.split("/")[0] for name in shapes if "/" in name})
    if any(re.fullmatch(r"efficientnet-b\d+", t) for t in tops):
        return _tpu_source(reader, shapes, tops, shown)
    scopes = {}
    for name in nets.names():
        if name in CONVERTIBLE and name != "resnet_v1_50_keras":
            scopes.setdefault(nets.build(name).scope, []).append(name)
    for top in tops:
        if top in scopes:
            return _slim_source(reader, shapes, scopes[top], model, shown)
    if any(".ATTRIBUTES" in name for name in shapes):
        raise UserError(f"SOURCE {shown} is an object-based (TF2) checkpoint, not one of the "
                        "published name-based ones; pass it to --ckpt_path if adjq wrote it")
    raise UserError(f"SOURCE {shown} is a TensorFlow checkpoint of no known network (its "
                    f"variables start with {', '.join(t + '/' for t in tops[:5]) or 'nothing'}); "
                    "known: efficientnet-b0/ (TPU EfficientNet), MobilenetV2/ and "
                    "resnet_v1_50/ (slim)")


class _Reader:
    """Checkpoint tensors by name, preferring ExponentialMovingAverage shadows."""

    def __init__(self, reader, shapes: dict, source: Source | None = None):
        self.reader, self.shapes, self.source = reader, shapes, source

    def get(self, name: str):
        if name + EMA_SUFFIX in self.shapes:
            self.source.ema_used += 1
            name = name + EMA_SUFFIX
        elif name not in self.shapes:
            return None
        return np.asarray(self.reader.get_tensor(name), dtype=np.float32), name


def _logits_scope(net) -> str:
    return f"{net.scope}/{net.nodes[-1].name}"


def _slim_source(reader, shapes, candidates: list[str], model: str | None, shown: str) -> Source:
    """A checkpoint with our own (slim) variable names."""
    if model == "resnet_v1_50_keras":
        raise UserError(f"SOURCE {shown} is a slim resnet_v1_50 checkpoint, arranged as slim's "
                        "network (strides in the last unit of each block); convert it with "
                        "--model resnet_v1_50 (resnet_v1_50_keras is for Keras ResNet50 weights)")
    first = nets.build(candidates[0])
    logits = _logits_scope(first) + "/weights"
    if logits + EMA_SUFFIX in shapes or logits in shapes:
        num_classes = int(shapes.get(logits, shapes.get(logits + EMA_SUFFIX))[-1])
    else:
        raise UserError(f"SOURCE {shown} has no variable {logits} (the logits that give the "
                        "class count)")
    chosen = candidates[0]
    if model in candidates:
        chosen = model
    elif model is None:
        for name in candidates:  # the variant whose every shape matches (e.g. the width)
            if _shapes_match(nets.build(name, num_classes=num_classes), shapes):
                chosen = name
                break
    source = Source(shown, "slim", chosen, num_classes,
                    f"a slim {first.scope} checkpoint", None)
    read = _Reader(reader, shapes, source)
    source.lookup = read.get
    return source


def _shapes_match(net, shapes: dict) -> bool:
    from adj_quant.network import weight_name, weight_shape

    layer_shapes = net.layer_shapes(32)
    for node in net.layers:
        _, cin, _, cout = layer_shapes[node.name]
        name = f"{net.scope}/{node.name}/{weight_name(node.op)}"
        found = shapes.get(name + EMA_SUFFIX, shapes.get(name))
        if found != weight_shape(node.op, node.kernel, cin, cout, node.conv_weights):
            return False
    return True


def _tpu_source(reader, shapes, tops: list[str], shown: str) -> Source:
    """The official TPU EfficientNet checkpoint (tensorflow/tpu models/official/efficientnet).

    Names follow ``efficientnet_model.py``: layers are named in the order they are first
    called inside each ``blocks_N`` variable scope, so a block with an expand conv has
    ``conv2d`` (expand), ``tpu_batch_normalization`` (bn0), ``depthwise_conv2d``,
    ``tpu_batch_normalization_1`` (bn1), ``se/conv2d`` (reduce), ``se/conv2d_1`` (expand),
    ``conv2d_1`` (project), ``tpu_batch_normalization_2`` (bn2); block 0 (expand ratio 1)
    has no expand conv, so its project conv is ``conv2d`` and its BNs are
    ``tpu_batch_normalization`` (depthwise) and ``tpu_batch_normalization_1`` (project).
    Keras' own converter (keras/applications/efficientnet_weight_update_util.py) maps them
    the same way."""
    from slim_nets import efficientnet_b0 as eb0

    prefix = next(t for t in tops if re.fullmatch(r"efficientnet-b\d+", t))
    if prefix != "efficientnet-b0":
        raise UserError(f"SOURCE {shown} is a TPU {prefix} checkpoint; only EfficientNet-B0 "
                        "is declared (efficientnet_b0)")
    names = _tpu_names(eb0, prefix)
    dense = f"{prefix}/head/dense/kernel"
    if dense not in shapes and dense + EMA_SUFFIX not in shapes:
        raise UserError(f"SOURCE {shown} has no variable {dense} (the classifier; a "
                        "features-only checkpoint cannot be converted)")
    num_classes = int(shapes.get(dense, shapes.get(dense + EMA_SUFFIX))[-1])
    source = Source(shown, "tpu", "efficientnet_b0", num_classes,
                    "a TPU EfficientNet-B0 checkpoint", None)
    read = _Reader(reader, shapes, source)

    def lookup(slim_name):
        tpu = names.get(slim_name)
        if tpu is None:
            return None
        found = read.get(tpu)
        if found is None:
            raise UserError(f"SOURCE {shown} has no variable {tpu} (for {slim_name}); is it a "
                            "complete EfficientNet-B0 checkpoint?")
        return found

    source.lookup = lookup
    return source


def _tpu_names(eb0, prefix: str) -> dict[str, str]:
    """{our slim name: TPU checkpoint name} for EfficientNet-B0."""
    ours = eb0.SCOPE
    bn_vars = ("gamma", "beta", "moving_mean", "moving_variance")
    names = {}

    def conv(scope, tpu_conv, tpu_bn, kernel="kernel", weights="weights"):
        names[f"{ours}/{scope}/{weights}"] = f"{prefix}/{tpu_conv}/{kernel}"
        for v in bn_vars:
            names[f"{ours}/{scope}/BatchNorm/{v}"] = f"{prefix}/{tpu_bn}/{v}"

    conv("Conv", "stem/conv2d", "stem/tpu_batch_normalization")
    for i, block in enumerate(eb0.blocks()):
        tpu, s = f"blocks_{i}", block.scope
        bn = [f"{tpu}/tpu_batch_normalization"] + [
            f"{tpu}/tpu_batch_normalization_{k}" for k in (1, 2)]
        if block.has_expand:
            conv(f"{s}/expand", f"{tpu}/conv2d", bn.pop(0))
            project = f"{tpu}/conv2d_1"
        else:
            project = f"{tpu}/conv2d"
        conv(f"{s}/dws", f"{tpu}/depthwise_conv2d", bn.pop(0), "depthwise_kernel",
             "depthwise_weights")
        for ours_se, tpu_se in (("se_1", "se/conv2d"), ("se_2", "se/conv2d_1")):
            names[f"{ours}/{s}/{ours_se}/weights"] = f"{prefix}/{tpu}/{tpu_se}/kernel"
            names[f"{ours}/{s}/{ours_se}/biases"] = f"{prefix}/{tpu}/{tpu_se}/bias"
        conv(f"{s}/project", project, bn.pop(0))
    conv("Conv_1", "head/conv2d", "head/tpu_batch_normalization")
    names[f"{ours}/Logits/weights"] = f"{prefix}/head/dense/kernel"
    names[f"{ours}/Logits/biases"] = f"{prefix}/head/dense/bias"
    return names


# --------------------------------------------------------------------------- Keras


@dataclasses.dataclass(frozen=True)
class _KerasFamily:
    application: str     # keras.applications function
    model: str           # our declared network
    kwargs: tuple = ()

    @property
    def title(self) -> str:
        alpha = dict(self.kwargs).get("alpha")
        return f"Keras {self.application}" + (f" (alpha {alpha})" if alpha else "")


def _family(entries: list[tuple[str, tuple]], shown: str) -> tuple[_KerasFamily, int]:
    """The Keras application and class count that a list of ``(path, shape)`` weights is."""
    dense = [s for _, s in entries if len(s) == 2]
    if not dense:
        raise UserError(f"SOURCE {shown} has no classifier layer (saved with "
                        "include_top=False? the *_notop.h5 files cannot be converted; use the "
                        "full weights file)")
    depthwise = [s for _, s in entries if len(s) == 4 and s[3] == 1 and s[0] == s[1] > 1]
    stems = [s for _, s in entries if len(s) == 4 and s[2] == 3]
    convs = [s for _, s in entries if len(s) == 4]
    stem = tuple(stems[0]) if len(stems) == 1 else None
    classes = int(dense[-1][1])
    if len(depthwise) == 16 and stem == (3, 3, 3, 32):
        return _KerasFamily("EfficientNetB0", "efficientnet_b0"), classes
    if len(depthwise) == 17 and stem in ((3, 3, 3, 32), (3, 3, 3, 48)):
        alpha = 1.0 if stem[3] == 32 else 1.4
        return _KerasFamily("MobileNetV2", "mobilenet_v2" if alpha == 1.0 else
                            "mobilenet_v2_140", (("alpha", alpha),)), classes
    if len(depthwise) == 17 and stem is not None:
        raise UserError(f"SOURCE {shown} is Keras MobileNetV2 weights with a {stem[3]}-channel "
                        "stem; only alpha 1.0 (mobilenet_v2) and 1.4 (mobilenet_v2_140) are "
                        "declared")
    if not depthwise and stem == (7, 7, 3, 64) and len(convs) == 53:
        return _KerasFamily("ResNet50", "resnet_v1_50_keras"), classes
    what = (f"{len(depthwise)} depthwise and {len(convs)} convolutions, stem "
            f"{list(stem) if stem else 'unknown'}")
    raise UserError(f"SOURCE {shown} is not Keras EfficientNetB0, MobileNetV2 or ResNet50 "
                    f"weights ({what}); other networks and sizes are not declared")


def _h5_entries(path: str, shown: str) -> list[tuple[str, tuple]]:
    import h5py

    entries = []
    try:
        with h5py.File(path, "r") as f:
            # A whole legacy model (model.save("x.h5")) keeps its weights in model_weights/,
            # beside the optimizer's.
            root = f["model_weights"] if "model_weights" in f else f
            root.visititems(lambda name, obj: entries.append((name, tuple(obj.shape)))
                            if isinstance(obj, h5py.Dataset) else None)
    except OSError as err:
        raise UserError(f"SOURCE {shown} is not a readable HDF5 weights file ({_reason(err)})"
                        ) from None
    return entries


def _keras_source(path: str, model: str | None) -> Source:
    import keras

    if path.lower().endswith(".keras"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keras_model = keras.saving.load_model(path, compile=False)
        except Exception as err:  # noqa: BLE001 (Keras raises many kinds for a bad file)
            raise UserError(f"SOURCE {path}: Keras cannot load it ({type(err).__name__}: "
                            f"{_reason(err)})") from None
        entries = [(w.path, tuple(w.shape)) for w in keras_model.weights]
        family, classes = _family(entries, path)
    else:
        family, classes = _family(_h5_entries(path, path), path)
        keras_model = getattr(keras.applications, family.application)(
            weights=None, classes=classes, classifier_activation=None, **dict(family.kwargs))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keras_model.load_weights(path)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"SOURCE {path}: {family.title} with {classes} classes cannot load "
                            f"it ({type(err).__name__}: {_reason(err)})") from None
    if model == "resnet_v1_50" and family.model == "resnet_v1_50_keras":
        raise UserError(f"SOURCE {path} holds Keras ResNet50 weights, arranged as Keras' network "
                        "(strides in the first unit of each stage); convert them with --model "
                        "resnet_v1_50_keras (resnet_v1_50 is slim's arrangement)")
    source = Source(path, "keras", family.model, classes, f"{family.title} weights", None)
    values = _keras_values(keras_model, family, source)
    source.lookup = values.get
    return source


def _keras_values(km, family: _KerasFamily, source: Source) -> dict:
    """{our slim name: (array, Keras weight name)} of a Keras application model."""
    net = nets.build(family.model, num_classes=source.num_classes)
    if family.model == "efficientnet_b0":
        _check_efficientnet_normalisation(km, source)
    values = {}
    for ours, conv_name, bn_name, options in _keras_layer_map(family.model):
        _add_keras_conv(values, km, net, family, source, ours, conv_name, bn_name, **options)
    return values


def _keras_layer_map(model: str) -> list[tuple[str, str, str | None, dict]]:
    """``(our scope, Keras conv layer, Keras batch-norm layer or None, options)`` of every
    convolution of a Keras application, in the order they are converted."""
    if model == "efficientnet_b0":
        from slim_nets import efficientnet_b0 as eb0

        out = [("Conv", "stem_conv", "stem_bn", {})]
        letters = []
        for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1)):
            letters += [f"block{stage + 1}{chr(ord('a') + j)}_" for j in range(repeats)]
        for k, block in zip(letters, eb0.blocks()):
            if block.has_expand:
                out.append((f"{block.scope}/expand", f"{k}expand_conv", f"{k}expand_bn", {}))
            out += [(f"{block.scope}/dws", f"{k}dwconv", f"{k}bn", {}),
                    (f"{block.scope}/se_1", f"{k}se_reduce", None, {}),
                    (f"{block.scope}/se_2", f"{k}se_expand", None, {}),
                    (f"{block.scope}/project", f"{k}project_conv", f"{k}project_bn", {})]
        return out + [("Conv_1", "top_conv", "top_bn", {}), ("Logits", "predictions", None, {})]
    if model.startswith("mobilenet_v2"):
        out = [("Conv", "Conv1", "bn_Conv1", {}),
               ("expanded_conv/depthwise", "expanded_conv_depthwise",
                "expanded_conv_depthwise_BN", {}),
               ("expanded_conv/project", "expanded_conv_project", "expanded_conv_project_BN",
                {})]
        for i in range(1, 17):
            for part in ("expand", "depthwise", "project"):
                out.append((f"expanded_conv_{i}/{part}", f"block_{i}_{part}",
                            f"block_{i}_{part}_BN", {}))
        return out + [("Conv_1", "Conv_1", "Conv_1_bn", {}),
                      ("Logits/Conv2d_1c_1x1", "predictions", None, {"dense_as_conv": True})]
    # ResNet50: conv<s>_block<b>_<i>_{conv,bn} -> block<s-1>/unit_<b>/bottleneck_v1/...
    out = [("conv1", "conv1_conv", "conv1_bn", {"flip_input": True})]
    parts = {0: "shortcut", 1: "conv1", 2: "conv2", 3: "conv3"}
    for stage, units in ((2, 3), (3, 4), (4, 6), (5, 3)):
        for b in range(1, units + 1):
            for i, part in parts.items():
                if i == 0 and b > 1:
                    continue
                k = f"conv{stage}_block{b}_{i}"
                out.append((f"block{stage - 1}/unit_{b}/bottleneck_v1/{part}", f"{k}_conv",
                            f"{k}_bn", {}))
    return out + [("logits", "predictions", None, {"dense_as_conv": True})]


def _keras_layer(km, family: _KerasFamily, source: Source, name: str):
    try:
        return km.get_layer(name)
    except ValueError:
        raise UserError(f"SOURCE {source.path} has no Keras layer {name!r}; is it an "
                        f"unmodified {family.title}?") from None


def _add_keras_conv(values: dict, km, net, family: _KerasFamily, source: Source, ours: str,
                    conv_name: str, bn_name: str | None = None, flip_input: bool = False,
                    dense_as_conv: bool = False) -> None:
    """Add one Keras convolution (or dense layer) and its batch norm or bias to ``values``."""
    import keras

    scope = net.scope
    lyr = _keras_layer(km, family, source, conv_name)
    weights = [np.asarray(w, np.float32) for w in lyr.get_weights()]
    kernel, bias = weights[0], (weights[1] if len(weights) > 1 else None)
    if flip_input:  # caffe BGR input channels -> RGB
        kernel = kernel[:, :, ::-1, :]
    if dense_as_conv:
        kernel = kernel.reshape((1, 1) + kernel.shape)
    depthwise = isinstance(lyr, keras.layers.DepthwiseConv2D)
    what = "depthwise_kernel" if depthwise else "kernel"
    values[f"{scope}/{ours}/{'depthwise_weights' if depthwise else 'weights'}"] = (
        np.ascontiguousarray(kernel), f"{conv_name}/{what}")
    if bn_name is None:
        if bias is None:
            raise UserError(f"SOURCE {source.path}: Keras layer {conv_name!r} has no bias")
        values[f"{scope}/{ours}/biases"] = (bias, f"{conv_name}/bias")
        return
    bn = _keras_layer(km, family, source, bn_name)
    if abs(float(bn.epsilon) - net.bn_epsilon) > 1e-9:
        raise UserError(f"SOURCE {source.path}: Keras layer {bn_name!r} has batch-norm "
                        f"epsilon {bn.epsilon}, {family.model} uses {net.bn_epsilon}")
    channels = kernel.shape[-2] if depthwise else kernel.shape[-1]
    gamma = (np.asarray(bn.gamma, np.float32) if bn.gamma is not None
             else np.ones(channels, np.float32))
    beta = (np.asarray(bn.beta, np.float32) if bn.beta is not None
            else np.zeros(channels, np.float32))
    mean = np.asarray(bn.moving_mean, np.float32)
    if bias is not None:  # BN(conv + b) == BN'(conv) with moving_mean - b
        mean = mean - bias
    for var, value, keras_name in (
            ("gamma", gamma, "gamma"), ("beta", beta, "beta"),
            ("moving_mean", mean, "moving_mean" + (" - conv bias" if bias is not None else "")),
            ("moving_variance", np.asarray(bn.moving_variance, np.float32),
             "moving_variance")):
        values[f"{scope}/{ours}/BatchNorm/{var}"] = (value, f"{bn_name}/{keras_name}")


def _check_efficientnet_normalisation(km, source: Source) -> None:
    """Compare the Keras model's input normalisation with efficientnet_b0's ((x - mean) / std
    on 0..1 RGB, the original EfficientNet's) and say what the conversion does about it."""
    import keras

    layers = [lyr for lyr in km.layers if isinstance(lyr, keras.layers.Normalization)]
    if len(layers) != 1:
        source.notes.append(f"warning: {source.path} has {len(layers)} Normalization layers; "
                            "efficientnet_b0 normalises with the ImageNet mean and std")
        return
    lyr = layers[0]
    mean = np.asarray(lyr.mean if lyr.input_mean is not None else lyr.adapt_mean).reshape(-1)
    variance = np.asarray(lyr.variance if lyr.input_mean is not None
                          else lyr.adapt_variance).reshape(-1)
    if mean.shape != (3,) or not np.allclose(mean, _IMAGENET_MEAN, atol=1e-4):
        source.notes.append(
            f"warning: {source.path} normalises with mean {np.round(mean, 4).tolist()} and "
            f"variance {np.round(variance, 4).tolist()}, not the ImageNet statistics "
            "efficientnet_b0 uses: the converted model sees its inputs differently")
    elif np.allclose(variance, _IMAGENET_STD, rtol=1e-3):
        source.notes.append(
            "note: the Normalization layer stores the ImageNet std as its variance (the "
            "published Keras EfficientNet weights, tensorflow/tensorflow#49930; "
            "EfficientNetB0(weights='imagenet') adds Rescaling(1/sqrt(std)) to undo it); "
            "efficientnet_b0 normalises with (x - mean) / std as the original EfficientNet")
    elif not np.allclose(variance, _IMAGENET_STD ** 2, rtol=1e-3):
        source.notes.append(
            f"warning: {source.path} normalises with variance "
            f"{np.round(variance, 4).tolist()}, neither the ImageNet std nor its square: the "
            "converted model (ImageNet mean/std) sees its inputs differently")
