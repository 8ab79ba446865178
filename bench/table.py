"""The README's headline table from benchmark JSONs.

    python -m bench.table bench/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cells(result: dict, alpha: float) -> list[dict]:
    return [c for c in result.get("e2e", []) if abs(c["alpha"] - alpha) < 1e-9]


def _best_fixed(result: dict, alpha: float) -> str:
    fixed = [c for c in _cells(result, alpha) if isinstance(c["k"], int) and c["k"] > 0]  # k = 0: the loop alone
    if not fixed:
        return "–"
    best = max(fixed, key=lambda c: c["speedup"])
    return f"{best['speedup']:.2f}x (k={best['k']})"


def _policy(result: dict, alpha: float, name: str) -> str:
    cell = next((c for c in _cells(result, alpha) if c["k"] == name), None)
    return "–" if cell is None else f"{cell['speedup']:.2f}x"


def _range(result: dict, key: str) -> str:
    """The least and greatest `key` of the drafting cells at alpha 0.5-0.9."""
    ratios = [c[key] for c in result.get("e2e", []) if 0.5 <= c["alpha"] <= 0.9 and key in c and c["k"] != 0]
    return "–" if not ratios else f"{min(ratios):.0%}–{max(ratios):.0%}"


def row(result: dict) -> str:
    plain = result.get("plain_ms_per_token")
    mlx_lm = result.get("mlx_lm_ms_per_token")
    steps = result.get("drafter_ms", {})
    drafter = " / ".join(f"{steps[head]:.2f}" for head in ("dense", "clustered") if head in steps)
    peak = [c["peak_gb"] for c in result.get("e2e", [])]
    memory = "–" if not peak or "plain_peak_gb" not in result else f"{result['plain_peak_gb']:.1f} / {max(peak):.1f}"
    cells = [
        f"{result['shape']} {result['bits']}",
        "–" if plain is None else f"{plain:.2f}",
        # Reports from before paired baseline trials hold the two medians only.
        "–" if mlx_lm is None else f"{result.get('plain_vs_mlx_lm', mlx_lm / plain):.2f}x",
        _policy(result, 0.0, "auto"),
        _best_fixed(result, 0.8),
        _policy(result, 0.8, "auto"),
        _range(result, "of_ideal"),
        _range(result, "of_predicted"),
        drafter or "–",
        memory,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | plain ms/token | plain vs mlx-lm | auto, α=0 | best fixed k, α=0.8 | auto, α=0.8 "
    "| measured / ideal (α 0.5–0.9) | measured / predicted (α 0.5–0.9) "
    "| drafter step ms (dense / clustered) | peak GB plain / spec |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main(paths: list[str]) -> int:
    print(HEADER)
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "results" not in report:  # bench.overhead / bench.peer / bench.exactness write other reports
            print(f"{path}: not a `python -m bench` report, left out", file=sys.stderr)
            continue
        for result in report["results"]:
            print(row(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
