"""The packed adjq file (``adjq-export --format packed``, ``aq.load_packed``) on a small
declared network with mixed per-channel bits, pruned weights and a removed channel.

Oracles: bit strings packed by hand; the file read with safetensors' own reader and its codes
decoded by a plain bit-by-bit loop; the original model's fake-quantized weights and logits
(compared bit for bit); the TFLite bytes converted from the checkpoint.
"""

import json
import math
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy as st
import tensorflow as tf
from conftest import TOY_NET

import adj_quant as aq
from adj_quant import packed
from adj_quant.checkpoints import ModelSpec, save_spec
from adj_quant.cli import export as E
from adj_quant.network import FloatNetwork, Network, Node
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork

NET = TOY_NET
OTHER = Network("toy", "toy", NET.nodes[:-1] + (Node("Logits", "fc", filters=5,
                                                     batch_norm=False),))
QUIET = ["--no-progress"]


def _out_axis(layer):
    return 2 if layer.kind == "dws" else len(layer.weights.shape) - 1


def _model(seed=0, pruned=True):
    """Trainable bits everywhere (swish inputs too), random per-channel bits 2..8 and ranges,
    and masks: random weights removed, channel 1 of every layer removed whole."""
    rng = np.random.default_rng(seed)
    cfg = QuantConfig(bits_trainable=True, pruned=pruned, swish_bits=0)
    model = QuantizedNetwork.from_float(FloatNetwork(NET, seed=seed), cfg, seed=seed)
    images = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    model.calibrate_activations([images], progress=False)
    for quant in model.quantizers().values():
        n = quant.channels
        if quant.bits_scale is not None:
            quant.bits_scale.assign(rng.integers(2, 9, n) / quant.init_bits)
        quant.range_scale.assign(rng.uniform(0.6, 1.2, n).astype(np.float32))
        quant.range_shift.assign(rng.uniform(-0.1, 0.2, n).astype(np.float32))
    if pruned:
        for layer in model.layers.values():
            mask = (rng.uniform(size=layer.mask.shape) > 0.3).astype(np.float32)
            index = [slice(None)] * mask.ndim
            index[_out_axis(layer)] = 1
            mask[tuple(index)] = 0
            layer.mask.assign(mask)
    return model, images


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    model, images = _model()
    spec = ModelSpec("quant", NET, model.qcfg)
    data, info = packed.pack(model, spec)
    path = tmp_path_factory.mktemp("packed") / "toy.safetensors"
    path.write_bytes(data)
    return {"model": model, "images": images, "spec": spec, "path": path, "info": info}


def test_pack_codes_by_hand():
    # 1 at 2 bits, 2 at 3 bits, 3 at 4 bits: 01 010 0011 -> 01010001 1(0000000)
    assert packed.pack_codes([1, 2, 3], [2, 3, 4]).tolist() == [0x51, 0x80]
    # 8-bit codes are plain bytes; 4-bit codes two per byte, high nibble first
    assert packed.pack_codes([200, 7], 8).tolist() == [200, 7]
    assert packed.pack_codes([0xA, 0xB, 0xC], 4).tolist() == [0xAB, 0xC0]
    rng = np.random.default_rng(1)
    widths = rng.integers(1, 9, 1000)
    codes = rng.integers(0, 1 << widths)
    data = packed.pack_codes(codes, widths)
    assert len(data) == math.ceil(widths.sum() / 8)
    np.testing.assert_array_equal(packed.unpack_codes(data, widths), codes)
    with pytest.raises(ValueError):
        packed.pack_codes([4], [2])


def test_load_packed_gives_the_same_network(toy):
    model, images = toy["model"], tf.constant(toy["images"])
    rebuilt = aq.load_packed(toy["path"])
    np.testing.assert_array_equal(rebuilt(images).numpy(), model(images).numpy())
    for scope, layer in model.layers.items():
        w, b = layer.quantized_weights()
        w2, b2 = rebuilt.layers[scope].quantized_weights()
        assert np.array_equal(w.numpy(), w2.numpy()), scope
        assert np.array_equal(b.numpy(), b2.numpy()), scope
    # the bits the score counts are the same too
    for name, quant in model.quantizers().items():
        np.testing.assert_array_equal(rebuilt.quantizers()[name].bits().numpy(),
                                      quant.bits().numpy())


def _read_bits(data: bytes, widths):
    """A plain MSB-first bit reader (independent of packed.unpack_codes)."""
    values, position = [], 0
    for width in widths:
        value = 0
        for _ in range(int(width)):
            byte = data[position // 8]
            value = (value << 1) | ((byte >> (7 - position % 8)) & 1)
            position += 1
        values.append(value)
    return values


def test_file_contents(toy):
    """Read with safetensors' own reader: the header, and each layer's codes decode (by a plain
    bit loop) to the model's fake-quantized weights; only kept weights are stored, each at its
    channel's bits, so the payload is ceil(counted bits / 8) per tensor."""
    model = toy["model"]
    with safetensors.safe_open(str(toy["path"]), framework="np") as f:
        meta = f.metadata()
        grouped = {key: f.get_tensor(key) for key in f.keys()}
    adjq = json.loads(meta["adjq"])
    # one tensor per kind, concatenated over the layers (sites) in order; the index gives the
    # counts
    assert "weights/codes" in grouped and "activations/min" in grouped
    tensors = {}
    for kind, counts in adjq["index"].items():
        site = kind.startswith("activations/")
        owners = adjq["owners"]["sites" if site else "layers"]
        ends = np.cumsum(counts)
        for owner, count, end in zip(owners, counts, ends):
            tensors[f"{owner}/{kind.removeprefix('activations/')}"] = grouped[kind][end - count:end]
    assert adjq["owners"]["layers"] == NET.layer_names
    assert adjq["format"] == "adjq-packed" and adjq["version"] == 1
    assert meta["checksum"].startswith("sha256:")
    assert ModelSpec.from_json(adjq["model"]).arch == NET
    total = 0
    for scope, layer in model.layers.items():
        axis = _out_axis(layer)
        want = np.moveaxis(layer.quantized_weights()[0].numpy(), axis, 0)
        mask = np.moveaxis(layer.mask.numpy(), axis, 0).reshape(len(want), -1) > 0
        bits = layer.weight_quant.bits().numpy().astype(int)
        kept = np.flatnonzero(mask.any(axis=1))
        assert 1 not in kept  # the removed channel is dropped
        np.testing.assert_array_equal(np.unpackbits(tensors[f"{scope}/weights/channels"])
                                      [:len(want)], mask.any(axis=1))
        np.testing.assert_array_equal(tensors[f"{scope}/weights/bits"], bits)
        widths = [bits[c] for c in kept for keep in mask[c] if keep]
        data = tensors[f"{scope}/weights/codes"].tobytes()
        assert len(data) == math.ceil(sum(widths) / 8), scope
        total += sum(widths)
        codes = iter(_read_bits(data, widths))
        s = tensors[f"{scope}/weights/scale"]
        z = tensors[f"{scope}/weights/zero_point"].astype(np.int64)
        flat = want.reshape(len(want), -1)
        for i, c in enumerate(kept):
            for j in np.flatnonzero(mask[c]):
                value = np.float32(next(codes) + z[i]) / s[i]
                assert value == flat[c, j], (scope, c, j)
        np.testing.assert_array_equal(tensors[f"{scope}/biases"], layer.biases.numpy())
    assert total == adjq["weight_bits"] == toy["info"]["weight_bits"]


def test_unpruned_model_is_dense(tmp_path):
    model, images = _model(seed=2, pruned=False)
    data, info = packed.pack(model, ModelSpec("quant", NET, model.qcfg))
    path = tmp_path / "dense.safetensors"
    path.write_bytes(data)
    tensors = st.load(data)
    assert not any(k.endswith(("/channels", "/mask")) for k in tensors)
    assert len(tensors) <= len(packed._LAYER_KINDS) + len(packed._SITE_KINDS)
    assert all(row["encoding"] == "dense" for row in info["layers"])
    rebuilt = aq.load_packed(path)
    np.testing.assert_array_equal(rebuilt(tf.constant(images)).numpy(),
                                  model(tf.constant(images)).numpy())


def _rewrite(path, out, change):
    """``path`` with its adjq metadata changed by ``change`` and a valid checksum."""
    tensors = st.load(path.read_bytes())
    with safetensors.safe_open(str(path), framework="np") as f:
        adjq = json.loads(f.metadata()["adjq"])
    text = json.dumps(change(adjq), sort_keys=True)
    out.write_bytes(st.save(tensors, metadata={"adjq": text,
                                               "checksum": packed._checksum(tensors, text)}))
    return out


def _one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        E.main([*argv, *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_files(toy, tmp_path):
    data = toy["path"].read_bytes()
    cases = {"truncated.safetensors": (data[:len(data) // 2], "truncated"),
             "short.safetensors": (data[:5], "truncated"),
             "garbage.safetensors": (b"\x10" + bytes(7) + b"not json at all!", "corrupt")}
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # inside the last tensor's bytes
    cases["flipped.safetensors"] = (bytes(flipped), "checksum")
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(aq.UserError) as err:
            aq.load_packed(tmp_path / name)
        message = str(err.value)
        assert name in message and expected in message and "\n" not in message, message
    newer = _rewrite(toy["path"], tmp_path / "v2.safetensors", lambda a: {**a, "version": 2})
    with pytest.raises(aq.UserError, match="v2.safetensors: packed format version 2 is unknown"):
        aq.load_packed(newer)
    with pytest.raises(aq.UserError, match="toy.safetensors is a packed file for another network"):
        aq.load_packed(toy["path"], network=OTHER)
    assert aq.load_packed(toy["path"], network=NET) is not None
    with pytest.raises(aq.UserError, match="no such packed file"):
        aq.load_packed(tmp_path / "missing.safetensors")


def _checkpoint(directory, model, kind):
    os.makedirs(directory, exist_ok=True)
    save_spec(str(directory), ModelSpec(kind, NET, model.qcfg if kind == "quant" else None))
    return tf.train.Checkpoint(model=model).write(str(directory / "ckpt"))


def test_cli_packed_round_trip_and_bad_input(toy, tmp_path, capsys):
    model = toy["model"]
    prefix = _checkpoint(tmp_path / "quant", model, "quant")
    out = tmp_path / "new" / "folder" / "m.safetensors"  # a missing parent is created
    result = E.main(["--ckpt_path", prefix, "--format", "packed", "--output", str(out), *QUIET])
    printed = capsys.readouterr().out
    assert result["output"] == str(out) and out.exists()
    assert "counted weight bits / 8" in printed and "block/dws" in printed
    rebuilt = aq.load_packed(out)
    images = tf.constant(toy["images"])
    np.testing.assert_array_equal(rebuilt(images).numpy(), model(images).numpy())
    # packed -> TFLite gives the bytes of checkpoint -> TFLite
    common = ["--quantization", "adjustable", "--img_size", "32", "--representative_images",
              "4", "--dataset", "synthetic", "--num_classes", "10"]
    from_ckpt = E.main(["--ckpt_path", prefix, "--output", str(tmp_path / "x" / "a.tflite"),
                        *common, *QUIET])  # a missing parent folder is created
    from_packed = E.main(["--from", "packed", "--ckpt_path", str(out), "--output",
                          str(tmp_path / "b.tflite"), *common, *QUIET])
    capsys.readouterr()
    assert (open(from_ckpt["output"], "rb").read() == open(from_packed["output"], "rb").read())

    # a float checkpoint
    float_prefix = _checkpoint(tmp_path / "float", FloatNetwork(NET), "float")
    target = tmp_path / "f.safetensors"
    msg = _one_line_error(capsys, ["--ckpt_path", float_prefix, "--format", "packed",
                                   "--output", str(target)])
    assert "float model" in msg and "packed needs a quantized checkpoint" in msg
    assert "float/ckpt" in msg and not target.exists()
    # a corrupt packed file -> no output
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out.read_bytes()[:-10])
    msg = _one_line_error(capsys, ["--from", "packed", "--ckpt_path", str(broken),
                                   "--output", str(tmp_path / "c.tflite"), *common])
    assert "broken.safetensors" in msg and "truncated" in msg
    assert not (tmp_path / "c.tflite").exists()
    # a packed file for another network than the flags say
    msg = _one_line_error(capsys, ["--from", "packed", "--ckpt_path", str(out), "--output",
                                   str(tmp_path / "d.tflite"), *common[:-1], "5"])
    assert "another network" in msg and "m.safetensors" in msg
    assert not (tmp_path / "d.tflite").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
