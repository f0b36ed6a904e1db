"""Per-layer bit-width bar charts, like the figures of the Adjustable Quantization paper."""

from __future__ import annotations

import io

import numpy as np


def layer_average_bits(bits, scopes: list[str]) -> tuple[list[float], list[float | None]]:
    """Mean weight bits and mean input-activation bits of every layer (``None``: the image)."""
    w = [float(np.mean(np.asarray(bits.weight[s]))) for s in scopes]
    a = [None if s == "Conv" else float(np.mean(np.asarray(bits.act[s]))) for s in scopes]
    return w, a


def layer_sparsity(bits, scopes: list[str]) -> list[float]:
    """The fraction of zero weights of every layer (0 for a layer without a mask)."""
    out = []
    for s in scopes:
        density = bits.density.get(s)
        out.append(0.0 if density is None else 1.0 - float(np.mean(np.asarray(density))))
    return out


#: The charts' resolution, and the bars' place in the drawing order: above the grid (0.5 with
#: ``axisbelow``), the spines (2.5) and the ticks (2.01), so that they are drawn last.
DPI = 110
BAR_ZORDER = 3.0


class BitsPlot:
    """Bar charts per layer of one network: average weight bits, average activation bits
    and, for a pruned model, the fraction of zero weights.

    The figure and its layout are made once; :meth:`png` sets the bars' heights and draws
    it. Training draws the chart whenever the bits change: a new figure each time took
    about three times as long (laying out the ~80 rotated layer names). :meth:`rgba`, what
    training writes to TensorBoard, draws only the bars, onto the rest of the chart drawn
    once (blitting): the same pixels, 0.02 s instead of 0.3 s for EfficientNet-B0. The
    bars are drawn last (above the grid and the axes' lines) so that both ways agree."""

    def __init__(self, scopes: list[str], sparse: bool, title: str = ""):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.scopes = scopes
        x = np.arange(len(scopes))
        rows = 3 if sparse else 2
        self.figure = Figure(figsize=(max(8.0, len(scopes) * 0.16), 3.0 * rows), dpi=DPI)
        self.canvas = FigureCanvasAgg(self.figure)
        self._background = None  # everything but the bars, drawn once (rgba)
        axes = self.figure.subplots(rows, 1, sharex=True)
        zeros = np.zeros(len(scopes))
        self.bars = [axes[0].bar(x, zeros, color="#3b6ea5", zorder=BAR_ZORDER),
                     axes[1].bar(x, zeros, color="#d17a22", zorder=BAR_ZORDER)]
        axes[0].set_ylabel("weight bits")
        axes[0].set_title(title or "average bits per layer")
        axes[1].set_ylabel("activation bits")
        for ax in axes[:2]:
            ax.set_ylim(0, 8.5)
            ax.set_yticks(range(0, 9, 2))
            ax.grid(axis="y", alpha=0.3)
        if sparse:
            self.bars.append(axes[2].bar(x, zeros, color="#6a3d9a", zorder=BAR_ZORDER))
            axes[2].set_ylabel("zero weights (%)")
            axes[2].set_ylim(0, 100)
            axes[2].grid(axis="y", alpha=0.3)
        axes[-1].set_xticks(x)
        axes[-1].set_xticklabels([_short(s) for s in scopes], rotation=90, fontsize=6)
        self.figure.tight_layout()

    def _set_heights(self, bits) -> None:
        w, a = layer_average_bits(bits, self.scopes)
        heights = [w, [np.nan if v is None else v for v in a]]
        if len(self.bars) == 3:
            heights.append([100 * v for v in layer_sparsity(bits, self.scopes)])
        for bars, values in zip(self.bars, heights):
            for bar, value in zip(bars, values):
                bar.set_height(value)

    def png(self, bits) -> bytes:
        """PNG bytes of the chart of ``bits`` (a :class:`~adj_quant.cost.BitAssignment`)."""
        self._set_heights(bits)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()

    def rgba(self, bits) -> np.ndarray:
        """The chart of ``bits`` as ``uint8 [height, width, 4]``, the pixels of :meth:`png`."""
        every_bar = [bar for bars in self.bars for bar in bars]
        if self._background is None:
            for bar in every_bar:
                bar.set_visible(False)
            self.canvas.draw()
            self._background = self.canvas.copy_from_bbox(self.figure.bbox)
            for bar in every_bar:
                bar.set_visible(True)
        self._set_heights(bits)
        self.canvas.restore_region(self._background)
        for bar in every_bar:
            self.figure.draw_artist(bar)
        return np.array(self.canvas.buffer_rgba())


def per_layer_bits_png(bits, scopes: list[str], title: str = "") -> bytes:
    """PNG bytes of the :class:`BitsPlot` of ``bits``."""
    return BitsPlot(scopes, bool(getattr(bits, "density", None)), title).png(bits)


def _short(scope: str) -> str:
    return scope.replace("expanded_conv", "ec")
