"""The per-layer chart of eval.py --plot and TensorBoard: bits, and the sparsity of a pruned
model, from a hand-made assignment."""

import io

import numpy as np
from matplotlib import image as mpimg

from adj_quant.cost import BitAssignment
from adj_quant.recipe.plots import BitsPlot, layer_sparsity, per_layer_bits_png

SCOPES = ["Conv", "block/project", "Logits"]


def _bits(density):
    weight = {"Conv": np.full(8, 8.0), "block/project": np.array([2.0, 4.0]),
              "Logits": np.full(10, 3.0)}
    act = {"Conv": 8.0, "block/project": np.full(8, 6.0), "Logits": np.full(8, 5.0)}
    return BitAssignment(weight, act, {}, 8, density=density)


def test_layer_sparsity_by_hand():
    density = {"block/project": np.array([[1.0, 0.5], [0.0, 0.5]]), "Logits": 0.25}
    assert layer_sparsity(_bits(density), SCOPES) == [0.0, 0.5, 0.75]


def test_a_pruned_model_gets_a_third_panel():
    dense = mpimg.imread(io.BytesIO(per_layer_bits_png(_bits({}), SCOPES)))
    sparse = mpimg.imread(io.BytesIO(per_layer_bits_png(
        _bits({"block/project": np.array([[1.0, 0.5], [0.0, 0.5]])}), SCOPES)))
    # 3.0 inches a panel at 110 dpi: 2 panels 660 px high, 3 panels 990 px.
    assert dense.shape[0] == 660 and sparse.shape[0] == 990


def test_a_chart_drawn_again_with_new_bits_equals_a_new_chart_of_them():
    """Training keeps one chart and changes its bars; oracle: a chart made afresh for the
    same bits, pixel for pixel (a new chart differs, so the comparison can fail)."""
    density = {"block/project": np.array([[1.0, 0.5], [0.0, 0.5]])}
    first, second = _bits(density), _bits(density)
    second.weight["Logits"] = np.full(10, 7.0)
    second.act["block/project"] = np.full(8, 2.0)
    plot = BitsPlot(SCOPES, sparse=True, title="t")
    before = mpimg.imread(io.BytesIO(plot.png(first)))
    after = mpimg.imread(io.BytesIO(plot.png(second)))
    fresh = mpimg.imread(io.BytesIO(per_layer_bits_png(second, SCOPES, "t")))
    assert not np.array_equal(before, fresh)
    np.testing.assert_array_equal(after, fresh)


def test_the_chart_training_writes_has_the_pixels_of_the_png():
    """TensorBoard's chart (``rgba``: only the bars drawn again, onto the rest drawn once)
    equals the PNG of a chart made afresh for the same bits, pixel for pixel, after the
    bars changed twice (oracle: matplotlib's whole drawing, decoded from the PNG)."""
    density = {"block/project": np.array([[1.0, 0.5], [0.0, 0.5]])}
    first, second = _bits(density), _bits(density)
    second.weight["Logits"] = np.full(10, 7.0)
    second.act["block/project"] = np.full(8, 2.0)
    plot = BitsPlot(SCOPES, sparse=True, title="t")
    for bits in (first, second, first):
        fresh = mpimg.imread(io.BytesIO(per_layer_bits_png(bits, SCOPES, "t")))
        drawn = plot.rgba(bits)
        assert drawn.dtype == np.uint8 and drawn.shape == fresh.shape
        np.testing.assert_array_equal(drawn, np.round(fresh * 255).astype(np.uint8))
    assert not np.array_equal(plot.rgba(second), plot.rgba(first))
