"""Plot a run's metrics.jsonl as PNG curves, one panel per metric.

    python scripts/plot_metrics.py outputs/quickstart_sft/metrics.jsonl [--keys loss eval/loss] [--output curves.png]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT_KEYS = ("loss", "eval/loss", "reward", "eval/reward", "kl", "lr", "grad_norm", "tokens_per_second")


def read_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: {path}:{line_number}: malformed JSON ({err.msg})")
        step = row.get("step")
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return series


def plot(series: dict, keys: list[str], output: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k in series]
    if not keys:
        raise SystemExit(f"error: none of the requested metrics are in the file; it has: {', '.join(sorted(series))}")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        steps, values = series[key]
        axis.plot(steps, values, marker="." if len(steps) < 50 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--keys", nargs="*", help="metrics to plot (default: the usual training curves present)")
    parser.add_argument("--output", type=Path, help="PNG path (default: beside the metrics file)")
    args = parser.parse_args()
    if not args.metrics.is_file():
        raise SystemExit(f"error: {args.metrics} does not exist")
    series = read_series(args.metrics)
    output = args.output or args.metrics.with_name("metrics.png")
    print(f"wrote {plot(series, args.keys or list(DEFAULT_KEYS), output)}")


if __name__ == "__main__":
    main()
