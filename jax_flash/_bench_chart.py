"""Bar charts of a benchmark report, laid out like the FlashAttention paper's speed figures.

One PNG per (pass, head dim) beside the report's JSON, e.g. bench_results_fwd_d128.png: x is the
sequence length, one bar per implementation, y is TFLOP/s, with non-causal and causal side by
side. Rows that did not run leave their bar out and are explained under the plot. Packed rows
(--segments N) stand at their documents' length, a hatched series of their own beside the dense
rows of that length.

Drawn on matplotlib's Agg canvas (no display, no pyplot state), from the JSON alone: no JAX.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

IMPL_STYLE = {  # label, colour
    "flash": ("jax-flash", "tab:orange"),
    "flash_xla": ("jax-flash (XLA path)", "tab:brown"),
    "cudnn": ("cuDNN", "tab:green"),
    "xla": ("XLA", "tab:blue"),
}
PASS_TITLES = {"fwd": "Forward", "fwd_bwd": "Forward + backward"}
PANEL_WIDTH_INCHES = 6.5


def chart_path(json_path: str, pass_: str, head_dim: int) -> str:
    """bench_results.json -> bench_results_fwd_d128.png, in the same folder."""
    stem = os.path.splitext(json_path)[0]
    return f"{stem}_{pass_}_d{head_dim}.png"


def write_charts(report: dict, json_path: str) -> list[str]:
    """Draws one chart per (pass, head dim) of `report`'s rows; returns the paths written."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in filter(None, map(_as_drawn, report["rows"])):
        # Reports from before fwd_bwd existed hold forward rows only.
        groups.setdefault((row.get("pass", "fwd"), row["head_dim"]), []).append(row)
    paths = []
    for (pass_, head_dim), rows in groups.items():
        path = chart_path(json_path, pass_, head_dim)
        _figure(report, pass_, head_dim, rows).savefig(path, dpi=120)
        paths.append(path)
    return paths


PACKED = " packed"  # suffix of a packed row's impl, once drawn


def _as_drawn(row: dict) -> dict | None:
    """A packed row as its series draws it: at its documents' length, with the batch its
    documents would fill as rows of their own (so the panel's token count still holds). Skipped
    packed rows (cuDNN and XLA take no segment ids) are left out: empty series only crowd it."""
    segments = row.get("segments", 1)
    if segments == 1:
        return row
    if row["status"].startswith("skipped"):
        return None
    return {**row, "impl": row["impl"] + PACKED, "seqlen": row["seqlen"] // segments,
            "batch": row["batch"] * segments}


def _style(impl: str) -> tuple[str, str | None, str | None]:
    """Label, colour and hatch of an implementation's bars: packed ones hatched."""
    base = impl.removesuffix(PACKED)
    label, colour = IMPL_STYLE.get(base, (base, None))
    if base == impl:
        return label, colour, None
    return f"{label}, packed", colour, "//"


def _figure(report: dict, pass_: str, head_dim: int, rows: list[dict]) -> Figure:
    causal_modes = sorted({row["causal"] for row in rows})
    fig = Figure(figsize=(PANEL_WIDTH_INCHES * len(causal_modes), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(causal_modes), sharey=True, squeeze=False)[0]
    for ax, causal in zip(axes, causal_modes):
        _panel(ax, [row for row in rows if row["causal"] == causal], causal)
    axes[0].set_ylabel("TFLOP/s")
    axes[-1].legend(loc="upper left", fontsize=8, frameon=False)
    fig.suptitle(f"{PASS_TITLES.get(pass_, pass_)}, head dim {head_dim}, {report['dtype']}: "
                 f"{report['device']}, {report['date'][:10]}", fontsize=11)
    notes = _not_run_notes(rows)
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=7, color="dimgray")
    return fig


def _panel(ax, rows: list[dict], causal: bool) -> None:
    seqlens = sorted({row["seqlen"] for row in rows})
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    by_key = {(row["impl"], row["seqlen"]): row for row in rows}
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        label, colour, hatch = _style(impl)
        xs = [x + (i - (len(impls) - 1) / 2) * width for x in range(len(seqlens))]
        cells = [by_key.get((impl, seqlen), {}) for seqlen in seqlens]
        heights = [cell["tflops"] if cell.get("status") == "ok" else 0.0 for cell in cells]
        bars = ax.bar(xs, heights, width, label=label, color=colour, hatch=hatch,
                      edgecolor="white" if hatch else None)
        ax.bar_label(bars, labels=[_value_label(h) if h else "" for h in heights],
                     fontsize=7, padding=1)
        for x, cell in zip(xs, cells):
            if cell.get("status", "ok") != "ok":  # a marker where the bar would stand
                ax.text(x, 0, " " + cell["status"].split(":")[0], rotation=90, fontsize=6,
                        ha="center", va="bottom", color="dimgray")
    ax.set_xticks(range(len(seqlens)), [_seqlen_label(s) for s in seqlens])
    ax.set_xlabel("sequence length")
    ax.set_title(f"causal{_shape_note(rows)}" if causal else f"non-causal{_shape_note(rows)}",
                 fontsize=10)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _value_label(tflops: float) -> str:
    return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 and seqlen % 1024 == 0 else str(seqlen)


def _shape_note(rows: list[dict]) -> str:
    """The paper's setup where the rows follow it: a fixed number of tokens and of heads."""
    tokens = {row["batch"] * row["seqlen"] for row in rows}
    heads = {row["num_heads"] for row in rows}
    if len(tokens) == 1 and len(heads) == 1:
        return f" (batch × seqlen = {tokens.pop()}, {heads.pop()} heads)"
    return ""


def _not_run_notes(rows: list[dict]) -> list[str]:
    """One line per implementation and distinct reason it did not run, with the seqlens hit."""
    seqlens_by_reason: dict[tuple[str, str], set[int]] = {}
    for row in rows:
        if row["status"] != "ok":
            seqlens_by_reason.setdefault((row["impl"], row["status"]), set()).add(row["seqlen"])
    return [f"{_style(impl)[0]} "
            f"({', '.join(_seqlen_label(s) for s in sorted(seqlens))}): {_shorten(status)}"
            for (impl, status), seqlens in seqlens_by_reason.items()]


def _shorten(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
