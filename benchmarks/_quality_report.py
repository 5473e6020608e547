"""What benchmarks/quality.py draws from its results file: perplexity against unstructured sparsity,
as a table (method x sparsity, both texts in each cell) and as a plot with a panel per text."""

from __future__ import annotations

from pathlib import Path

# metric of the sparse model, metric of the dense one (in results["dense"]), per evaluation text
PANELS = {"WikiText-2 test": ("perplexity_sparse", "perplexity"),
          "fortunes (out of domain)": ("perplexity_sparse.fortunes", "perplexity_fortunes")}


def _unstructured(results: dict, targets: str) -> list[dict]:
    return [r for r in results["runs"].values() if r["targets"] == targets and r["structure"] == "unstructured"]


def sparsity_grid(results: dict, targets: str, methods: tuple[str, ...]) -> list[str]:
    """One row per method with unstructured runs, one column per sparsity measured, each cell
    'WikiText-2 / fortunes' (blank where a run or its second text is missing)."""
    runs = _unstructured(results, targets)
    if not runs:
        return []
    sparsities = sorted({r["sparsity"] for r in runs})
    cells = {(r["method"], r["sparsity"]): r["metrics"] for r in runs}
    order = [m for m in methods if any(key[0] == m for key in cells)]
    order += sorted({m for m, _ in cells} - set(order))
    lines = ["| unstructured sparsity | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---" * (len(sparsities) + 1) + "|"]
    for method in order:
        row = []
        for sparsity in sparsities:
            m = cells.get((method, sparsity))
            row.append("" if m is None else " / ".join(_ppl(m.get(k)) for k, _ in PANELS.values()))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def _ppl(x) -> str:
    return "—" if x is None else f"{x:,.2f}"


def plot(results: dict, chosen: list[str], targets: str, path: Path, sparsities: tuple[float, ...],
         fill_command: str) -> None:
    """Perplexity against unstructured sparsity of the `chosen` methods, a panel per evaluation
    text: WikiText-2 test, and the out-of-domain text where runs have it. `fill_command` (with
    {method} and {todo}) is printed for a method that lacks one of `sparsities`."""
    runs = _unstructured(results, targets)
    curves = {title: {m: sorted((r["sparsity"], r["metrics"][metric]) for r in runs
                                if r["method"] == m and r["metrics"].get(metric) is not None) for m in chosen}
              for title, (metric, _) in PANELS.items()}
    curves = {title: {m: c for m, c in by_method.items() if c} for title, by_method in curves.items()}
    curves = {title: by_method for title, by_method in curves.items() if by_method}
    if not curves:
        print(f"plot: no unstructured runs of {', '.join(chosen) or 'any method'} yet")
        return
    for method, points in next(iter(curves.values())).items():
        missing = [s for s in sparsities if s not in {p[0] for p in points}]
        if missing:
            todo = ",".join(f"{s:g}" for s in missing)
            print(f"plot: {method} lacks {todo}: {fill_command.format(method=method, todo=todo)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (title, by_method) in zip(axes[0], curves.items()):
        for method, points in by_method.items():
            ax.plot(*zip(*points), marker="o", label=method)
        dense = results.get("dense", {}).get(PANELS[title][1])
        if dense is not None:
            ax.axhline(dense, color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")  # perplexity grows by orders of magnitude from 30% to 70%
        ax.set(xlabel="unstructured sparsity of the targets", ylabel=f"{title} perplexity", title=title)
        ax.legend()
    fig.suptitle(f"{results['protocol']['model']}, {targets} targets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path} ({len(curves)} panel{'s' if len(curves) > 1 else ''}: {', '.join(curves)})")
