"""Plots of saved benchmark output: ``python recipes/plot_benchmarks.py [plot] [--data D] [--out D]``.

Reads the JSON files that ``recipes/benchmark.py SUITE --json PATH`` writes (default
folder ``docs/assets/bench``) and writes one ``<suite>.svg`` per file next to them, with
the command, date and machine of the run under the plot. Needs matplotlib (``docs``
extra).

``import-md PAGE.md --suite S --command C --date D --machine M [--tables I ...]`` turns
markdown tables already printed by a suite (e.g. in ``docs/benchmarks*.md``) into the same
JSON format, for runs made before ``--json`` existed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

logger = logging.getLogger("plot_benchmarks")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "docs" / "assets" / "bench"

# suite → how to draw it: ("lines", x, series columns, y label, log y) draws one line per
# column against x; ("grouped", label, series, value columns) draws bars of each value per
# label, one colour per series (``series`` None: one colour per table); ("barh", label,
# value, x label) draws horizontal bars, one panel per table.
SPECS: dict[str, tuple] = {
    "ops": ("grouped", "shape", "impl", ["speed-up fwd+bwd", "peak mem / transformers"]),
    "sync": ("lines", "m", ["mmlayers CPU ms", "official CPU ms", "dense CPU ms"],
             "CPU ms per fwd+bwd", True),
    "llm": ("lines", "images", ["bare ms", "mmlayers ms", "naive ms"],
            "CPU ms per decoded token", True),
    "vision": ("grouped", "part", None, ["× ViT (CPU)"]),
    "unet": ("barh", "case", "CPU ms", "CPU ms (log scale)"),
    "model": ("barh", "what", "CPU s", "CPU seconds"),
    "session": ("grouped", "way", None, ["× session", "× session (text)"]),
}


def number(cell: object) -> float | None:
    """A table cell as a float (``"2.63x"`` → 2.63); ``None`` for "—", "-", "skipped …"."""
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return float(cell)
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*x?\s*", str(cell))
    return float(m.group(1)) if m else None


def markdown_tables(text: str) -> list[dict]:
    """Every GitHub-markdown table of ``text`` as ``{"header", "rows"}`` (cells as text)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            tables.append({"header": block[0], "rows": block[2:]})
        block = []
    return tables


def import_markdown(page: Path, *, suite: str, command: str, date: str, machine: str,
                    tables: list[int] | None = None, titles: list[str] | None = None) -> dict:
    found = markdown_tables(page.read_text())
    picked = [found[i] for i in tables] if tables else found
    for i, t in enumerate(picked):
        if titles:
            t["title"] = titles[i]
    return {"suite": suite, "command": command, "date": date, "machine": machine,
            "source": f"{page.name} (markdown tables)", "tables": picked}


def _column(table: dict, name: str) -> int:
    if name not in table["header"]:
        raise ValueError(f"column {name!r} not in table header {table['header']}")
    return table["header"].index(name)


# Legibility: the docs show a plot at most CONTENT_PX CSS pixels wide (the content column
# of the site at a 1280 px window, measured in Chromium); a figure about FIG_W inches wide
# is shown at about its own size there, so FONT points are about FONT pixels on the page.
CONTENT_PX = 688
FIG_W = 9.0
FONT, SMALL = 12.5, 11.5


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(str(text), width, break_on_hyphens=False)) or str(text)


def _plain_log_labels(axis) -> None:
    """Log-axis labels as plain numbers ("1000", not a small superscript in "10³")."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _lines(ax, tables, x, columns, ylabel, log):
    for t in tables:
        xi = _column(t, x)
        for col in columns:
            ci = _column(t, col)
            pts = [(number(r[xi]), number(r[ci])) for r in t["rows"]]
            pts = [p for p in pts if None not in p]
            label = col.replace(" CPU ms", "").replace(" ms", "")
            if len(tables) > 1:
                label += f" ({t.get('title', '')})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    ls="-" if t is tables[0] else "--", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
        ax.set_xscale("log")
        xs = sorted({number(r[_column(t, x)]) for t in tables for r in t["rows"]})
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        _plain_log_labels(ax.yaxis)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=SMALL, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=2 if len(tables) > 1 else len(columns), frameon=False)


def _grouped(axes, tables, label, series, values):
    for ax, col in zip(axes, values, strict=True):
        groups: dict[str, dict[str, float]] = {}
        for t in tables:
            li, vi = _column(t, label), _column(t, col)
            si = _column(t, series) if series else None
            for r in t["rows"]:
                v = number(r[vi])
                if v is not None:
                    key = r[si] if si is not None else t.get("title", "")
                    groups.setdefault(key, {})[r[li]] = v
        labels = list(dict.fromkeys(k for g in groups.values() for k in g))
        width = 0.8 / max(1, len(groups))
        for j, (name, g) in enumerate(groups.items()):
            xs = [i + j * width for i, k in enumerate(labels) if k in g]
            ax.bar(xs, [g[k] for k in labels if k in g], width, label=name)
        crowded = max(len(k) for k in labels) > 75 / len(labels)  # ~7 pt a character
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels,
                      fontsize=SMALL, rotation=25 if crowded else 0,
                      ha="right" if crowded else "center", rotation_mode="anchor")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(_wrap(col, 22))
        ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1 or any(groups):  # one untitled table: nothing to tell apart
        axes[0].legend(fontsize=SMALL, loc="lower center", bbox_to_anchor=(0.5, 1.02),
                       ncol=min(len(groups), 3 if max(map(len, groups)) > 14 else 5),
                       frameon=False)


def _barh(axes, tables, label, value, xlabel):
    for ax, t in zip(axes, tables, strict=True):
        li, vi = _column(t, label), _column(t, value)
        rows = [(r[li], number(r[vi])) for r in t["rows"] if number(r[vi]) is not None]
        ax.barh(range(len(rows)), [v for _, v in rows], color="#4c72b0")
        ax.set_yticks(range(len(rows)), [_wrap(k, 34) for k, _ in rows], fontsize=SMALL)
        ax.invert_yaxis()
        if "log" in xlabel:
            ax.set_xscale("log")
            _plain_log_labels(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
        for i, (_, v) in enumerate(rows):
            ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.3g}", va="center",
                    fontsize=SMALL)
        if t.get("title"):
            ax.set_title(t["title"], fontsize=FONT)


def plot(record: dict, path: Path) -> None:
    """One figure of one saved suite run (see ``SPECS``), legible at the docs' width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "mmlayers", "svg.fonttype": "none",
                         "font.size": FONT, "xtick.labelsize": SMALL,
                         "ytick.labelsize": SMALL, "legend.fontsize": SMALL})
    suite, tables = record["suite"], record["tables"]
    if suite not in SPECS:
        raise ValueError(f"no plot defined for suite {suite!r}; known: {sorted(SPECS)}")
    kind, *spec = SPECS[suite]
    if kind == "lines":
        fig, ax = plt.subplots(figsize=(FIG_W, 5.2), layout="constrained")
        _lines(ax, tables, *spec)
    elif kind == "grouped":
        n = len(spec[2])
        fig, axes = plt.subplots(n, 1, figsize=(FIG_W, 1.4 + 3.6 * n), squeeze=False,
                                 layout="constrained")
        _grouped(axes[:, 0], tables, *spec)
    else:
        rows = sum(len(t["rows"]) + 2 for t in tables)
        fig, axes = plt.subplots(len(tables), 1, squeeze=False, layout="constrained",
                                 figsize=(FIG_W, 0.6 + 0.5 * rows))
        _barh(axes[:, 0], tables, *spec)
    command = textwrap.wrap(f"$ {record['command']}", 84, subsequent_indent="    ",
                            break_on_hyphens=False)
    head = textwrap.wrap(f"{suite} · {record['date']} · {record['machine']}", 84)
    fig.suptitle("\n".join([*head, *command]), fontsize=SMALL, family="monospace",
                 ha="left", x=0.0)
    fig.savefig(path, metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    p_plot = sub.add_parser("plot", help="plot every saved JSON (the default)")
    p_plot.add_argument("--data", default=str(DEFAULT_DIR), help="folder of <suite>.json")
    p_plot.add_argument("--out", default=None, help="output folder (default: --data)")
    p_imp = sub.add_parser("import-md", help="markdown tables → JSON")
    p_imp.add_argument("page")
    p_imp.add_argument("--suite", required=True)
    p_imp.add_argument("--command", required=True)
    p_imp.add_argument("--date", required=True)
    p_imp.add_argument("--machine", required=True)
    p_imp.add_argument("--tables", type=int, nargs="*", help="indices of the tables to keep")
    p_imp.add_argument("--titles", nargs="*", help="a title per kept table")
    p_imp.add_argument("--out", default=None, help="JSON path (default: <data>/<suite>.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] not in (["plot"], ["import-md"], ["-h"], ["--help"]):
        argv = ["plot", *argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "import-md":
        record = import_markdown(Path(args.page), suite=args.suite, command=args.command,
                                 date=args.date, machine=args.machine, tables=args.tables,
                                 titles=args.titles)
        out = Path(args.out or DEFAULT_DIR / f"{args.suite}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        logger.info("wrote %s (%d tables)", out, len(record["tables"]))
        return [out]
    data = Path(getattr(args, "data", None) or DEFAULT_DIR)
    out_dir = Path(getattr(args, "out", None) or data)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(data.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("suite") not in SPECS:
            logger.info("skipped %s: no plot for suite %r", path, record.get("suite"))
            continue
        written.append(out_dir / f"{path.stem}.svg")
        plot(record, written[-1])
    return written


if __name__ == "__main__":
    main()
