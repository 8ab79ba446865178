"""PNG plots of a benchmark report: speedup against acceptance per draft length (with the
ideal), and the verify cost curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, stem: Path) -> None:
    for result in report["results"]:
        name = f"{result['shape']}-{result['bits']}"
        if result.get("e2e"):
            _speedups(result, stem.parent / f"{stem.name}-{name}-speedup.png")
        if result.get("verify_ms"):
            _costs(result, stem.parent / f"{stem.name}-{name}-cost.png")


def _speedups(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = sorted({c["k"] for c in result["e2e"]}, key=str)
    for i, k in enumerate(ks):
        cells = sorted((c for c in result["e2e"] if c["k"] == k), key=lambda c: c["alpha"])
        color = f"C{i % 10}"
        ax.plot([c["alpha"] for c in cells], [c["speedup"] for c in cells], "o-", color=color, label=f"k={k}")
        ideal = [(c["alpha"], c["ideal"]) for c in cells if "ideal" in c]
        if ideal:
            ax.plot(*zip(*ideal), "--", color=color, alpha=0.5)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("acceptance α (replayed)")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(f"{result['shape']} {result['bits']}: measured (solid) and ideal (dashed)")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _costs(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for context, costs in result["verify_ms"].items():
        ls = sorted(costs, key=int)
        ax.plot([int(L) for L in ls], [costs[L] for L in ls], "o-", label=f"context {context}")
    ax.set_xlabel("new tokens L in one target forward")
    ax.set_ylabel("ms")
    drafter = ", ".join(f"{h} {ms:.2f} ms" for h, ms in result["drafter_ms"].items())
    ax.set_title(f"{result['shape']} {result['bits']}: verify cost; drafter step {drafter}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
