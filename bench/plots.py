"""PNG plots of a `python -m bench` report: the batched cost surface (ms of a forward of B rows x
L tokens), and speedup over batched plain decoding against B per acceptance (measured, solid;
Leviathan's ideal from the same run's costs, dashed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_report(report: dict, stem: Path) -> None:
    for result in report["results"]:
        name = f"{result['shape']}-{result['bits']}"
        if result.get("costs"):
            _costs(result, stem.parent / f"{stem.name}-{name}-cost.png")
        if any(entry.get("cells") for entry in result.get("batches", {}).values()):
            _speedups(result, stem.parent / f"{stem.name}-{name}-speedup.png")


def _costs(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for B, costs in result["costs"].items():
        verify = {int(L): ms for L, ms in costs["verify_ms"].items() if L.isdigit()}
        ax.plot(sorted(verify), [verify[L] for L in sorted(verify)], "o-", label=f"B={B}")
    ax.set_xlabel("new tokens per row L in one target forward (L = k + 1 verifies k drafts)")
    ax.set_ylabel("ms")
    ax.set_title(f"{result['shape']} {result['bits']}: batched verify cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedups(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cells = [c for entry in result["batches"].values() for c in entry.get("cells", [])]
    series = sorted({(c["acceptance"], str(c["k"])) for c in cells})
    for i, (acceptance, k) in enumerate(series):
        mine = sorted(
            (c for c in cells if (c["acceptance"], str(c["k"])) == (acceptance, k)), key=lambda c: c["batch"]
        )
        color = f"C{i % 10}"
        ax.plot(
            [c["batch"] for c in mine],
            [c["speedup"] for c in mine],
            "o-",
            color=color,
            label=f"{acceptance} k={k}",
        )
        ideal = [(c["batch"], c["ideal"]) for c in mine if "ideal" in c]
        if ideal:
            ax.plot(*zip(*ideal), "--", color=color, alpha=0.5)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("speedup over batched plain decoding")
    ax.set_title(f"{result['shape']} {result['bits']}: measured (solid) and ideal (dashed)")
    ax.legend(ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
