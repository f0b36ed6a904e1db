"""``adjq-score --model keras:PATH``: the MicroNet counts of a saved Keras model, untrained.

Oracle: the built-in declaration of the same architecture (MobileNetV2 x1.4, the
challenge's reference network) gives the same folded parameter count and operations.
"""

import json

import pytest

from adj_quant.cli import score

keras = pytest.importorskip("keras")


def _score(capsys, *args) -> dict:
    score.main([*args, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_keras_mobilenet_v2_140_scores_as_the_declaration(tmp_path, capsys):
    model = keras.applications.MobileNetV2(alpha=1.4, weights=None, classes=1000,
                                           input_shape=(224, 224, 3))
    path = tmp_path / "mobilenet_v2_140.keras"
    model.save(path)
    for bits in (["--weight_bits", "32", "--act_bits", "32", "--no_freebie"],
                 ["--weight_bits", "4", "--act_bits", "4"]):
        ours = _score(capsys, "--model", f"keras:{path}", *bits)
        builtin = _score(capsys, "--model", "mobilenet_v2_140", *bits)
        assert ours["params"] == builtin["params"]
        assert ours["multiplies"] == builtin["multiplies"] and ours["adds"] == builtin["adds"]
    # folded: every conv's BN becomes one bias per channel, the classifier keeps its own
    assert ours["params"] > 0
    float_counts = _score(capsys, "--model", f"keras:{path}", "--weight_bits", "32",
                          "--act_bits", "32", "--no_freebie")
    bn_channels = sum(int(layer.gamma.shape[0]) for layer in model.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    gamma_beta_mean_var = 4 * bn_channels
    assert float_counts["params"] == model.count_params() - gamma_beta_mean_var + bn_channels


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no Keras model file"),
    (lambda p: p.write_text("not a model"), "Keras cannot load"),
])
def test_bad_keras_files_are_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "bad.keras"
    make(path)
    with pytest.raises(SystemExit) as exit_info:
        score.main(["--model", f"keras:{path}", "--json"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
