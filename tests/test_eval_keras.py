"""``eval.py --model keras:PATH``: a saved Keras model scored and evaluated without training.

The oracle is Keras itself: the model is trained briefly with ``model.fit`` on the digits
training split, and ``eval.py --float`` must count the same validation images right as the
Keras model's own predictions do. Quantized at 8 bits it stays close to that, and its
``quant_info.json`` gives ``adjq-score`` the scores ``eval.py`` printed.
"""

import json

import numpy as np
import pytest

from adj_quant.cli import evaluate, score

keras = pytest.importorskip("keras")

DATA = ["--dataset", "digits", "--img_size", "32", "--max_val_images", "360", "--no-progress"]


@pytest.fixture(scope="module")
def trained_keras(tmp_path_factory):
    """A small conv net trained for a few epochs on the digits training split, saved."""
    from adj_quant.recipe.data import make_dataset

    keras.utils.set_random_seed(5)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.Activation("swish")(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.Activation("swish")(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = keras.layers.Conv2D(32, 1, use_bias=False)(x)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = make_dataset("digits", "train", batch_size=64, img_size=32, training=False)
    model.fit(train.map(lambda images, labels: (images, labels)), epochs=10, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "digits_net.keras"
    model.save(path)
    val = make_dataset("digits", "validation", batch_size=120, img_size=32, training=False)
    images, labels = (np.concatenate(part) for part in zip(*((i.numpy(), y.numpy())
                                                            for i, y in val)))
    return path, model.predict(images, verbose=0), labels


def _eval(argv, capsys) -> dict:
    assert evaluate.main([*argv, "--json"]) in (0, None)
    return json.loads(capsys.readouterr().out)


def test_eval_of_a_keras_model_matches_keras_and_the_scorer(trained_keras, tmp_path, capsys):
    path, logits, labels = trained_keras
    top2 = np.sort(logits, axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-3))  # import round-off may flip these
    keras_right = int(np.sum(np.argmax(logits, axis=1) == labels))
    assert keras_right / len(labels) > 0.5, "the Keras model did not learn; the test is void"

    model = ["--model", f"keras:{path}"]
    as_float = _eval([*model, *DATA, "--float", "--output", str(tmp_path / "f/")], capsys)
    assert as_float["images"] == len(labels)
    assert abs(round(as_float["top1"] * len(labels)) - keras_right) <= near_ties

    out = tmp_path / "q8" / "quant_info.json"
    q8 = _eval([*model, *DATA, "--weight_bits", "8", "--act_bits", "8", "--output", str(out)],
               capsys)
    assert abs(q8["top1"] - as_float["top1"]) <= 0.03
    assert q8["avg_weight_bits"] == pytest.approx(8) and q8["avg_act_bits"] == pytest.approx(8)
    assert json.loads(out.read_text())["summary"]["top1"] == pytest.approx(q8["top1"])

    # the scorer reads the same quant_info.json with the same network: the same scores
    assert score.main(["--model", f"keras:{path}", "--quant_info", str(out),
                       "--img_size", str(q8["metric_img_size"]), "--json"]) in (0, None)
    counted = json.loads(capsys.readouterr().out)
    for key in ("score_micronet", "score_adjq", "params", "ops"):
        assert counted[key] == pytest.approx(q8[key], rel=1e-9), key


def test_eval_of_a_keras_model_refuses_a_wrong_class_count(trained_keras, capsys):
    path, _, _ = trained_keras
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", f"keras:{path}", *DATA, "--num_classes", "7"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "classes" in err and "Traceback" not in err
