"""Result files next to each other: JSON for programs, a Markdown table and a bar plot for people."""

import json
from collections.abc import Sequence
from pathlib import Path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value):
        return f"{100 * value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 1.5), 3.5))
    bars = axes.bar(labels, [100 * value for value in values], color="tab:blue")
    axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_ylim(0, 100)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(output_dir: Path, stem: str, results: dict, markdown: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(markdown)
