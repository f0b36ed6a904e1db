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


def per_layer_bits_png(bits, scopes: list[str], title: str = "") -> bytes:
    """PNG bytes of bar charts per layer: average weight bits, average activation bits and,
    for a pruned model, the fraction of zero weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, a = layer_average_bits(bits, scopes)
    sparse = bool(getattr(bits, "density", None))
    x = np.arange(len(scopes))
    rows = 3 if sparse else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8.0, len(scopes) * 0.16), 3.0 * rows),
                             sharex=True)
    axes[0].bar(x, w, color="#3b6ea5")
    axes[0].set_ylabel("weight bits")
    axes[0].set_title(title or "average bits per layer")
    axes[1].bar(x, [np.nan if v is None else v for v in a], color="#d17a22")
    axes[1].set_ylabel("activation bits")
    for ax in axes[:2]:
        ax.set_ylim(0, 8.5)
        ax.set_yticks(range(0, 9, 2))
        ax.grid(axis="y", alpha=0.3)
    if sparse:
        axes[2].bar(x, [100 * v for v in layer_sparsity(bits, scopes)], color="#6a3d9a")
        axes[2].set_ylabel("zero weights (%)")
        axes[2].set_ylim(0, 100)
        axes[2].grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([_short(s) for s in scopes], rotation=90, fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _short(scope: str) -> str:
    return scope.replace("expanded_conv", "ec")
