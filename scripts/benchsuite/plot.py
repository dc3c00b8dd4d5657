"""Plot the latency distributions of a benchmark run (runs in the bench venv, which has matplotlib).

    python scripts/benchsuite/plot.py RESULTS.json OUT.png
"""
import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    rows = [r for r in data["rows"] if r.get("latency") and r.get("tt")]
    if not rows:
        rows = [r for r in data["rows"] if r.get("tt")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.6 * len(rows) + 0.8), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        series = [("Tinytown", row["tt"], "tab:blue")]
        if row.get("peer"):
            series.append((row["peer_name"] or "peer", row["peer"], "tab:orange"))
        labels = [s[0] for s in series]
        ax.boxplot([s[1] for s in series], vert=False, widths=0.6, showfliers=False)
        for i, (_, samples, colour) in enumerate(series, 1):
            ax.scatter(samples, [i] * len(samples), s=9, alpha=0.6, color=colour, zorder=3)
        ax.set_yticks(range(1, len(series) + 1), labels)
        values = [v for s in series for v in s[1]]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_title(f"{row['what']}", fontsize=9, loc="left")
        ax.set_xlabel(row["unit"], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    m = data.get("machine", {})
    fig.suptitle(f"Tinytown vs peers, {data.get('when', '')}, {m.get('cpus', '?')} CPUs {m.get('cpu', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
