"""The report's figures: every row in a utility-vs-forgetting plane, and the grid curves of the
rows compared at equal forgetting."""

from __future__ import annotations


def _mean_std(value):
    if isinstance(value, dict):
        return value["mean"], value.get("std") or 0.0
    return value, 0.0


def plot_rows(rows, path, x, y, title, xlog=False):
    """Each row at its (x, y) seed mean with ± std bars, its grid points (first seed) joined by
    a faint line; x, y = (key, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"reference": "s", "teacher": "D", "harness": "o", "ours": "*"}
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        if row.get(x[0]) is None or row.get(y[0]) is None:
            continue
        color = "grey" if row["kind"] == "reference" else colors(i % 10)
        grid = [
            (g[x[0]], g[y[0]])
            for g in row.get("lr_grid", [])
            if g.get(x[0]) is not None and g.get("in_grid", True)
        ]
        if len(grid) > 1:
            gx, gy = zip(*grid, strict=True)
            ax.plot(gx, gy, color=color, alpha=0.35, lw=1, marker=".", ms=5)
        (mx, sx), (my, sy) = _mean_std(row[x[0]]), _mean_std(row[y[0]])
        ax.errorbar(
            mx,
            my,
            xerr=sx,
            yerr=sy,
            color=color,
            marker=markers[row["kind"]],
            ms=9,
            capsize=3,
            lw=1.2,
        )
        ax.annotate(row["name"], (mx, my), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(x[1])
    ax.set_ylabel(y[1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_equal_forgetting(rows, comparisons, path, matching_key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_name = {row["name"]: row for row in rows}
    fig, axes = plt.subplots(1, len(comparisons), figsize=(6.4 * len(comparisons), 4.6))
    for ax, c in zip(fig.axes, comparisons, strict=True):
        for name in (c["row"], c["baseline"]):
            grid = sorted(
                (g[c["matched_on"]], g[c["utility"]], g["learning_rate"])
                for g in by_name[name]["lr_grid"]
            )
            xs, ys, _ = zip(*grid, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
            for gx, gy, lr in grid:
                ax.annotate(
                    f"{lr:g}", (gx, gy), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.set_xscale("log")
        # a range within one decade gets labelled minor ticks that overprint each other
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"{matching_key[1]} (lower = more forgotten, log)")
        ax.set_ylabel(c["utility"])
        ax.set_title(f"{c['row']} vs {c['baseline']}: lr grid (labels: lr)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
