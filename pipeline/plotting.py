"""Figures shared by the stages (matplotlib, Agg; no pyplot state)."""

from __future__ import annotations

from cofi.structure import structure_summary


def structure_figure(table: dict[str, list], num_heads: int, intermediate_size: int, title: str | None = None):
    """A bar chart per layer of the fraction of attention heads and FFN units kept.

    ``table``: :func:`cofi.structure.structure_table`. Layers with neither heads
    nor units left are shaded and labelled "removed".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(table["layer"])
    figure = Figure(figsize=(max(4.0, 0.6 * n + 2.0), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    x = list(range(n))
    width = 0.38
    ax.bar([i - width / 2 for i in x], table["heads_kept"], width, label=f"heads (of {num_heads})", color="#4C72B0")
    ax.bar([i + width / 2 for i in x], table["ffn_kept"], width, label=f"FFN units (of {intermediate_size})", color="#DD8452")
    for i, removed in enumerate(table["removed"]):
        if removed:
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", zorder=0)
            ax.text(i, 0.5, "removed", rotation=90, ha="center", va="center", color="0.35", fontsize=8)
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlim(-0.5, n - 0.5 if n else 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    summary = structure_summary(table, num_heads, intermediate_size)
    ax.set_title(title or f"heads kept {summary['heads_kept']:.0%}, FFN units kept {summary['ffn_kept']:.0%}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    return figure
