"""The comparison report: a markdown table, a JSON record and a quality-versus-size plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_write_text, save_figure

COLUMNS = [  # (header, key, format)
    ("method", "label", "{}"),
    ("bits/weight", "bits_per_weight", "{:.3f}"),
    ("block linears bits/weight", "quantized_bits_per_weight", "{:.3f}"),
    ("total MB", "bytes", "{:.1f}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("KLD vs base", "kld", "{:.4f}"),
    ("top-1 agree", "top1", "{:.2%}"),
    ("calibration s", "calibration_seconds", "{:.1f}"),
    ("peak calib. MiB", "calibration_peak_mib", "{:.0f}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("high-precision dims", "high_precision_fraction", "{:.2%}"),
    ("high-precision MACs", "high_precision_mac_fraction", "{:.2%}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    if key == "bytes":
        v = v / 1e6
    return fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    """One row per model; columns no row has a value for (e.g. LLM.int8()'s shares) are left out."""
    cols = [c for c in COLUMNS if c[1] == "label" or any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |")
    return "\n".join(lines)


def write_results(out: str | Path, rows: list[dict], meta: dict, caption: str, headers: list[str],
                  cells: list[list[str]]) -> str:
    """A benchmark's record: OUT.json ({"rows", "meta"}) and OUT.md (the caption, then one table row per entry of
    `cells`), both written atomically; returns the markdown."""
    out = Path(out)
    text = "\n".join([caption, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    atomic_write_text(out.with_suffix(".json"), json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    atomic_write_text(out.with_suffix(".md"), text)
    return text


def write_report(out: Path, rows: list[dict], meta: dict, title: str = "lowbit compare") -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", "", markdown_table(rows), ""]
    text += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    atomic_write_text(out / "report.md", "\n".join(text) + "\n")
    atomic_write_text(out / "report.json", json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    plot_tradeoff(out / "tradeoff.png", rows)


def plot_tradeoff(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_kld) = plt.subplots(1, 2, figsize=(12, 5))
    base = next((r for r in rows if r.get("is_base")), None)
    for r in rows:
        if r.get("is_base"):
            continue
        x = r["bits_per_weight"]
        ax_ppl.scatter(x, r["ppl"], s=40)
        ax_ppl.annotate(r["label"], (x, r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if r.get("kld") is not None:
            ax_kld.scatter(x, r["kld"], s=40)
            ax_kld.annotate(r["label"], (x, r["kld"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if base is not None:
        ax_ppl.axhline(base["ppl"], color="black", linestyle="--", linewidth=1)
        ax_ppl.scatter(base["bits_per_weight"], base["ppl"], marker="*", s=200, color="black", zorder=3)
        ax_ppl.annotate(base["label"], (base["bits_per_weight"], base["ppl"]),
                        textcoords="offset points", xytext=(-60, 8), fontsize=8)
    ax_ppl.set_xscale("log", base=2)
    ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("bits per weight (all weights, scales and zero points included; log scale)")
    ax_ppl.set_ylabel("perplexity on held-out text (lower is better; log scale)")
    ax_ppl.set_title("Quality vs size: perplexity" + (" (dashed: base)" if base else ""))
    ax_kld.set_xlabel("bits per weight")
    ax_kld.set_ylabel("mean KL divergence from the base (nats, log scale)")
    ax_kld.set_yscale("log")
    ax_kld.set_title("Quality vs size: KL divergence")
    for ax in (ax_ppl, ax_kld):
        ax.grid(True, alpha=0.3)
    save_figure(fig, path)
