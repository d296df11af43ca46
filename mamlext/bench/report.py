"""The suite's table (stdout) and plot (PNG) from its results dict."""
from typing import List, Optional

from mamlext.bench.common import noisy_note
from mamlext.bench.impls import MAMLEXT_IMPLS


def _cells(row: dict) -> List[str]:
    steps = "" if row["steps"] is None else str(row["steps"])
    head = [row["case"], str(row["tasks"]), steps, row["impl"]]
    if row["status"] != "ok":
        return head + ["", "", "", "", "", "", "", f"{row['status'].upper()}: {row['reason']}"]
    speedup = lambda key: "" if row[key] is None else f"{row[key]:.2f}x"  # noqa: E731
    memory = "" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.1f}"
    error = "" if row["rel_error"] is None else f"{row['rel_error']:.1e}"
    note = "ok" + noisy_note(row.get("foreign_cpu_load"))
    return head + [f"{row['median_ms']:.4g} ({row['iqr_ms']:.2g})", f"{row['tasks_per_s']:,.0f}",
                   speedup("speedup_vs_loop"), speedup("speedup_vs_vmap"), speedup("speedup_vs_l2l-style"), memory,
                   error, note]


def _distributed_title(section: dict) -> str:
    if section["status"] != "ok":
        return f"distributed: {section['status'].upper()}: {section['reason']}"
    w = section["workload"]
    return (f"distributed: sinusoid MLP {w['mlp']}, T = {w['tasks']}, N = {w['inner_steps']}, {w['engine']}, "
            f"{w['device'].upper()} processes ({w['backend']}); ms = median per meta-iteration (interquartile range); "
            "scaling = tasks/s / tasks/s with 1 process")


def _distributed_cells(row: dict) -> List[str]:
    load = "" if row["foreign_load_cpus"] is None else f"{row['foreign_load_cpus']:.2f}"
    return [str(row["world_size"]), str(row["threads_per_process"]), f"{row['median_ms']:.4g} ({row['iqr_ms']:.2g})",
            f"{row['tasks_per_s']:,.0f}", f"{row['scaling']:.2f}x", load + (" NOISY" if row["noisy"] else "")]


DISTRIBUTED_COLS = ["processes", "threads each", "ms (IQR)", "tasks/s", "scaling", "other programs' CPUs"]


def format_table(results: dict) -> str:
    """The per-implementation table (when cases ran), the distributed table (with --distributed) and the notes."""
    lines = []
    if results["rows"]:
        cols = ["case", "T", "N", "impl", "ms (IQR)", "tasks/s", "vs loop", "vs vmap", "vs l2l-style", "peak MiB",
                "rel err", "status"]
        lines += aligned(cols, [_cells(r) for r in results["rows"]], [
            f"{results['title']}: ms = median per meta-iteration "
            "(interquartile range); vs = that implementation's median / this one's; peak MiB = "
            f"{results['memory_kind']}; rel err = normwise relative error of the meta-gradient vs the plain loop"])
    section = results.get("distributed")
    if section is not None:
        lines += [""] if lines else []
        lines += [_distributed_title(section)] if section["status"] != "ok" else aligned(
            DISTRIBUTED_COLS, [_distributed_cells(r) for r in section["rows"]], [_distributed_title(section)])
    if results["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)


def aligned(cols: List[str], table: List[List[str]], title: List[str]) -> List[str]:
    """A plain-text table, columns padded; the last column is not (it holds long reasons)."""
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols[:-1])]
    lines = title + ["  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  " + cols[-1],
                     "  ".join("-" * w for w in widths) + "  ------"]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1] for cells in table]


def markdown_table(results: dict) -> str:
    """The tables as Markdown (results.md, for the README): one line per implementation of each case, then one per
    process count of the distributed measurement."""
    parts = []
    if results["rows"]:
        head = ["case", "T", "N", "implementation", "ms (IQR)", "tasks/s", "vs loop", "vs vmap", "vs l2l-style",
                "peak MiB", "status"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in results["rows"]:
            cells = _cells(row)
            status = cells[-1] if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            lines.append("| " + " | ".join(cells[:4] + cells[4:10] + [status.replace("|", "/")]) + " |")
        parts.append("\n".join(lines))
    section = results.get("distributed")
    if section is not None:
        lines = [_distributed_title(section)]
        if section["status"] == "ok":
            lines += ["", "| " + " | ".join(DISTRIBUTED_COLS) + " |", "|" + "---|" * len(DISTRIBUTED_COLS)]
            lines += ["| " + " | ".join(_distributed_cells(r)) + " |" for r in section["rows"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_speedups(results: dict, path: str) -> Optional[str]:
    """speedup.png: the mamlext engines' speedup against the plain loop (top) and vmap (bottom) over the task count
    T, one column per number of inner steps N, one line per case family and engine. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok" and r["impl"] in MAMLEXT_IMPLS
            and r["steps"] is not None]
    steps = sorted({r["steps"] for r in rows}) or [1]
    fig, axes = plt.subplots(2, len(steps), figsize=(5.5 * len(steps), 8), squeeze=False)
    for col, n in enumerate(steps):
        for line_row, baseline in enumerate(("loop", "vmap")):
            ax = axes[line_row][col]
            key = f"speedup_vs_{baseline}"
            lines = {}
            for r in rows:
                if r["steps"] == n and r[key] is not None:
                    lines.setdefault(f"{r['family']} {r['impl']}", []).append((r["tasks"], r[key]))
            for label, points in sorted(lines.items()):
                points.sort()
                ax.plot([t for t, _ in points], [s for _, s in points], marker="o", label=label)
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tasks per meta-batch T")
            ax.set_ylabel(f"speedup vs {baseline}")
            ax.set_title(f"N = {n} inner step{'s' if n > 1 else ''}: mamlext vs {baseline}")
            if lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no measured speedups", transform=ax.transAxes, ha="center")
    fig.suptitle(f"{results['title']} "
                 f"({results['machine'].get('gpu_name') or results['machine']['cpu_model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
