"""The batched headline table from `python -m bench` reports: a row per model and batch size.

    python -m bench.table bench/results/*.json

Speedups are over our batched plain decoding at the same B (paired trials, while the batch is
full: see `measure`); "measured / ideal" is the range of measured over Leviathan's ideal over
the drafting cells at acceptance 0.6 and above (the 26B profile and the ragged mix included).
Reports of the single-sequence bench (before the batched engine) have no batches and are left
out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| model | B | plain tok/s (ms/row-token) | plain vs mlx-lm | auto, α=0 | best fixed k, α=0.8 | auto, α=0.8 "
    "| auto, 26B profile | auto, ragged mix | measured / ideal | peak GB plain / spec |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _cells(entry: dict, acceptance: str) -> list[dict]:
    return [c for c in entry.get("cells", []) if c["acceptance"] == acceptance]


def _auto(entry: dict, acceptance: str) -> str:
    cell = next((c for c in _cells(entry, acceptance) if c["k"] == "auto"), None)
    return "–" if cell is None else f"{cell['speedup']:.2f}x"


def _best_fixed(entry: dict, acceptance: str) -> str:
    fixed = [c for c in _cells(entry, acceptance) if isinstance(c["k"], int) and c["k"] > 0]
    if not fixed:
        return "–"
    best = max(fixed, key=lambda c: c["speedup"])
    return f"{best['speedup']:.2f}x (k={best['k']})"


def _high_acceptance(cell: dict) -> bool:
    kind, _, value = cell["acceptance"].partition("=")
    return kind != "alpha" or float(value) >= 0.6


def _of_ideal(entry: dict) -> str:
    ratios = [
        c["of_ideal"]
        for c in entry.get("cells", [])
        if "of_ideal" in c and c["k"] != 0 and _high_acceptance(c)
    ]
    return "–" if not ratios else f"{min(ratios):.0%}–{max(ratios):.0%}"


def _memory(entry: dict) -> str:
    peaks = [c["peak_gb"] for c in entry.get("cells", [])]
    return (
        "–"
        if not peaks or "plain_peak_gb" not in entry
        else f"{entry['plain_peak_gb']:.2f} / {max(peaks):.2f}"
    )


def row(result: dict, entry: dict) -> str:
    plain = entry.get("plain_tokens_per_s")
    cells = [
        f"{result['shape']} {result['bits']}",
        str(entry["batch"]),
        "–" if plain is None else f"{plain:.1f} ({entry['plain_ms_per_row_token']:.2f})",
        "–" if "plain_vs_mlx_lm" not in entry else f"{entry['plain_vs_mlx_lm']:.2f}x",
        _auto(entry, "alpha=0.0"),
        _best_fixed(entry, "alpha=0.8"),
        _auto(entry, "alpha=0.8"),
        _auto(entry, "profile=26b-vllm"),
        next(
            (
                _auto(entry, c["acceptance"])
                for c in entry.get("cells", [])
                if c["acceptance"].startswith("ragged")
            ),
            "–",
        ),
        _of_ideal(entry),
        _memory(entry),
    ]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> int:
    print(HEADER)
    for path in paths:
        report = json.loads(Path(path).read_text())
        results = [r for r in report.get("results", []) if "batches" in r]
        if not results:  # other reports (compare_loops, peer, ...) and the single-sequence bench's
            print(f"{path}: no batched `python -m bench` results, left out", file=sys.stderr)
        for result in results:
            for entry in result["batches"].values():
                print(row(result, entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
