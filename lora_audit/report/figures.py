"""Report figures: matplotlib (Agg) rendered to inline SVG strings.

Every figure has labelled axes, uses a colour-blind-safe palette (Okabe & Ito 2008 for lines
and bars, viridis for heat maps; lines also differ by marker and dash so they survive grey-scale
printing) and is sized for a laptop-width page. The SVG is made safe to inline many times in one
HTML page: no XML prolog, no metadata, no namespace URLs, and every id prefixed per figure.
Text strings (model and matrix names) end up as SVG text, escaped by matplotlib's writer.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Sequence

import matplotlib

from ..text import printable

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..text import sci

# Okabe-Ito, without yellow (too light on white) first.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["-", "--", "-.", ":"]
HEAT_CMAP = "viridis"
MAX_POINTS = 400  # per line: keeps the SVG small

_counter = itertools.count(1)

RC = {
    "svg.fonttype": "none",  # text stays text: smaller, selectable, escaped by the writer
    "text.parse_math": False,  # names are text: "cost $5 and $6" must not become mathtext
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def style(i: int) -> dict:
    """Colour, marker and dash of the i-th series."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[(i // len(OKABE_ITO)) % len(DASHES)]}


def new_figure(width: float = 7.0, height: float = 3.2) -> Figure:
    with plt.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
    return fig


_ID_RE = re.compile(r'\bid="([^"]+)"')


def to_svg(fig: Figure, *, desc: str = "") -> str:
    """The figure as an inline-safe SVG string (see the module docstring)."""
    buf = io.StringIO()
    with plt.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop <?xml ...?> and <!DOCTYPE ...> (it names a URL)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    n = next(_counter)
    svg = _compact(svg)
    ids = set(_ID_RE.findall(svg))
    if ids:
        svg = _ID_RE.sub(lambda m: f'id="f{n}-{m.group(1)}"', svg)
        svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#f{n}-{m.group(1)})" if m.group(1) in ids else m.group(0), svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#f{n}-{m.group(1)}"' if m.group(1) in ids else m.group(0),
                     svg)
    # Scale with the page: keep the viewBox, let CSS set the width.
    svg = re.sub(r'<svg([^>]*?)\swidth="[^"]*"\s+height="[^"]*"', r'<svg\1', svg, count=1)
    label = _xml_escape(printable(desc))
    # natural size (points -> CSS px) as the largest width: small figures do not blow up
    width_px = fig.get_figwidth() * 72 * 1.3
    svg = svg.replace("<svg", f'<svg role="img" aria-label="{label}" class="fig" style="max-width:{width_px:.0f}px"', 1)
    return svg.strip()


_NUM_RE = re.compile(r"(\d+\.\d\d)\d+")


def _compact(svg: str) -> str:
    """Smaller SVG: no unreferenced ids, 2-decimal coordinates, short font lists, no indentation."""
    referenced = set(re.findall(r"url\(#([^)]+)\)", svg)) | set(re.findall(r'href="#([^"]+)"', svg))
    svg = _ID_RE.sub(lambda m: m.group(0) if m.group(1) in referenced else "", svg)
    svg = re.sub(r'\s(d|x|y|transform|points|width|height)="([^"]*)"',
                 lambda m: " " + m.group(1) + '="' + _NUM_RE.sub(r"\1", m.group(2)) + '"', svg)
    svg = re.sub(r"font-family: [^;\"]*;?\s*", "", svg)
    svg = re.sub(r'\stransform="rotate\(-?0 [^"]*\)"', "", svg)
    svg = svg.replace("<style type=\"text/css\">",
                      "<style type=\"text/css\">text{font-family:'DejaVu Sans',Arial,sans-serif}", 1)
    svg = re.sub(r"<g\s*>\s*</g>", "", svg)
    svg = re.sub(r">\s+<", "><", svg)
    svg = re.sub(r"\s*\n\s*", " ", svg)
    return svg


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _thin(xs: Sequence, ys: Sequence) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return list(xs), list(ys)
    step = math.ceil(len(xs) / MAX_POINTS)
    return list(xs)[::step], list(ys)[::step]


def short_label(name: str, width: int = 28) -> str:
    """A name for a figure: printable (control and bidi characters as escapes, ``text.printable``),
    cut to ``width`` characters from the left. Every name a figure shows goes through here."""
    name = printable(name)
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _image(ax, arr, vmax: float, aspect: str = "auto"):
    """A heat map drawn as one embedded image (a few hundred bytes, unlike one SVG path per
    cell); cell (r, c) covers [c, c+1] x [r, r+1] with row 0 at the top."""
    import numpy as np

    nr, nc = (arr.shape if getattr(arr, "ndim", 0) == 2 else (0, 0))
    cmap = matplotlib.colormaps[HEAT_CMAP].with_extremes(bad="#ffffff")
    im = ax.imshow(np.ma.masked_invalid(arr) if nr and nc else np.zeros((1, 1)), cmap=cmap, vmin=0, vmax=vmax,
                   interpolation="none", extent=(0, max(nc, 1), max(nr, 1), 0), aspect=aspect)
    ax.grid(False)
    for r in range(1, nr):
        ax.axhline(r, color="white", linewidth=0.6)
    for c in range(1, nc):
        ax.axvline(c, color="white", linewidth=0.6)
    return im


# ---- spectrum ---------------------------------------------------------------------------
def epsilon_curves(series: list[tuple[str, list[float], list[float]]], *, epsilon: float | None = None,
                   ylabel: str = "intruder dimensions (total)") -> str:
    """Intruders vs epsilon, one line per tuned model (the paper's Fig. 4 style)."""
    with plt.rc_context(RC):
        fig = new_figure(7.0, 3.4)
        ax = fig.add_subplot()
        for i, (name, eps, counts) in enumerate(series):
            ax.plot(eps, counts, label=short_label(name), linewidth=1.6, markersize=4, **style(i))
        if epsilon is not None:
            ax.axvline(epsilon, color="#555555", linewidth=0.8, linestyle=":")
            ax.annotate(f"ε = {epsilon:g}", (epsilon, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize=8, color="#333333")
        ax.set_xlabel("similarity threshold ε (intruder if max |cos| < ε)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        top = max([max(c, default=0) for _, _, c in series] + [0])
        ax.set_ylim(0, max(1, top) * 1.05)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if series:
            ax.legend(loc="upper left", frameon=False, ncol=1 if len(series) <= 6 else 2)
        return to_svg(fig, desc="Intruder dimensions versus epsilon for each tuned model")


def layer_module_heatmap(grid: list[list[float]], layers: list[str], modules: list[str], *, title: str,
                         marks: list[list[float]] | None = None, vmax: float | None = None,
                         cbar_label: str = "drift = 1 − lowest max |cos| of the top k") -> str:
    """Layer (rows) x module (columns) heat map of a continuous score (``grid``, NaN: no matrix),
    on a colour scale from 0 to ``vmax`` (default: the largest value, at least 1). ``marks``: a
    count per cell (intruder dimensions), written in the cells where it is above 0."""
    import numpy as np

    arr = np.asarray(grid, dtype=float) if grid else np.zeros((0, 0))
    with plt.rc_context(RC):
        h = min(6.0, 1.2 + 0.14 * max(1, len(layers)))
        fig = new_figure(min(7.0, 2.4 + 0.7 * max(1, len(modules))), h)
        ax = fig.add_subplot()
        if vmax is None:
            vmax = max(1.0, float(np.nanmax(arr))) if arr.size and not np.all(np.isnan(arr)) else 1.0
        mesh = _image(ax, np.ma.masked_invalid(arr), vmax)
        ax.set_xticks([i + 0.5 for i in range(len(modules))], [short_label(m, 14) for m in modules],
                      rotation=30 if len(modules) > 4 else 0, ha="right" if len(modules) > 4 else "center")
        step = max(1, math.ceil(len(layers) / 32))
        ax.set_yticks([i + 0.5 for i in range(0, len(layers), step)], layers[::step])
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(title, loc="left")
        for (r, c), n in (np.ndenumerate(np.asarray(marks, dtype=float)) if marks else ()):
            if n > 0:
                ax.text(c + 0.5, r + 0.5, f"{n:g}", ha="center", va="center", fontsize=7, fontweight="bold",
                        color="black" if arr[r, c] > 0.6 * vmax else "white")
        cb = fig.colorbar(mesh, ax=ax, shrink=0.9)
        cb.set_label(cbar_label)
        return to_svg(fig, desc=f"Heat map per layer and module of {cbar_label}: {title}")


def cos_heatmap(cos: list[list[float]], *, title: str, intruder_rows: Sequence[int] = (),
                epsilon: float | None = None) -> str:
    """|cos| of the top tuned singular vectors (rows) against the top base vectors (columns),
    the paper's Fig. 1 style: a bright diagonal means the tuned vectors are the base's; dark
    rows are intruders."""
    import numpy as np

    arr = np.asarray(cos, dtype=float)
    with plt.rc_context(RC):
        fig = new_figure(3.6, 3.2)
        ax = fig.add_subplot()
        mesh = _image(ax, arr, 1.0, aspect="equal")
        nr, nc = arr.shape if arr.ndim == 2 else (0, 0)
        ax.set_xticks([i + 0.5 for i in range(nc)], [str(i + 1) for i in range(nc)])
        ax.set_yticks([i + 0.5 for i in range(nr)], [str(i + 1) for i in range(nr)])
        ax.set_xlabel("base singular vector (rank)")
        ax.set_ylabel("tuned singular vector (rank)")
        for r in intruder_rows:
            if 0 <= r < nr:
                ax.annotate("◀", (nc, r + 0.5), xytext=(2, 0), textcoords="offset points", va="center",
                            fontsize=8, color="#D55E00", annotation_clip=False)
        ax.set_title(title, loc="left", fontsize=8)
        cb = fig.colorbar(mesh, ax=ax, shrink=0.85)
        cb.set_label("|cos|")
        return to_svg(fig, desc=f"Cosine similarity of top singular vectors: {title}")


def singular_values(series: list[tuple[str, list[float], list[bool]]], *, title: str) -> str:
    """Top singular values of tuned matrices (log scale); intruder directions drawn as crosses."""
    with plt.rc_context(RC):
        fig = new_figure(7.0, 3.0)
        ax = fig.add_subplot()
        for i, (name, sv, intr) in enumerate(series):
            st = style(i)
            x = list(range(1, len(sv) + 1))
            ax.plot(x, sv, label=short_label(name, 40), color=st["color"], linestyle=st["linestyle"],
                    linewidth=1.4)
            # zips not strict here and in this module's other plots: the lists come from result files the
            # report reads, which may be short; a plot draws the pairs that are there
            ax.scatter([a for a, f in zip(x, intr, strict=False) if not f], [s for s, f in zip(sv, intr, strict=False) if not f],
                       color=st["color"], marker="o", s=14, zorder=3)
            ax.scatter([a for a, f in zip(x, intr, strict=False) if f], [s for s, f in zip(sv, intr, strict=False) if f],
                       color=st["color"], marker="X", s=46, zorder=4, edgecolors="black", linewidths=0.4)
        values = [v for _, sv, _ in series for v in sv]
        log = bool(values) and min(values) > 0 and max(values) / min(values) > 20
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("rank j of tuned singular value")
        ax.set_ylabel("σ_j (log scale)" if log else "σ_j")
        ax.set_title(title + "   (× = intruder)", loc="left")
        if series:
            ax.legend(loc="upper right", frameon=False, fontsize=7)
        return to_svg(fig, desc=f"Singular value spectra: {title}")


def per_layer_lines(series: list[tuple[str, list[int], list[float]]], *, ylabel: str, title: str = "",
                    floor: float | None = 0) -> str:
    """One line per tuned model against the layer index (e.g. mean effective rank of dW); the y axis
    starts at ``floor`` (None: where the data do)."""
    with plt.rc_context(RC):
        fig = new_figure(7.0, 3.0)
        ax = fig.add_subplot()
        for i, (name, xs, ys) in enumerate(series):
            xs, ys = _thin(xs, ys)
            ax.plot(xs, ys, label=short_label(name), linewidth=1.5, markersize=4, **style(i))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        if floor is not None:
            ax.set_ylim(bottom=floor)
        if title:
            ax.set_title(title, loc="left")
        if series:
            ax.legend(loc="best", frameon=False, ncol=1 if len(series) <= 6 else 2)
        return to_svg(fig, desc=f"{ylabel} per layer")


# ---- studies ----------------------------------------------------------------------------
SYMLOG_FROM = 50  # lr_curves: counts up to this are drawn on a linear axis


def lr_curves(series: list[tuple[str, list[float], list[float | None]]], *, ylabel: str, title: str = "",
              integer: bool = False, threshold: float | None = None, threshold_label: str = "",
              band: tuple[float, float] | None = None, band_label: str = "") -> str:
    """One line per method against the learning rate (log axis), the paper's Fig. 5 style.
    ``threshold``: a dotted horizontal line (e.g. epsilon); ``band``: a shaded horizontal range
    (e.g. what a random direction reaches at the audited widths). None values are gaps."""
    from matplotlib.ticker import MaxNLocator, NullLocator

    with plt.rc_context(RC):
        fig = new_figure(7.0, 3.2)
        ax = fig.add_subplot()
        if band is not None:
            ax.axhspan(band[0], band[1], color="#999999", alpha=0.25, linewidth=0, label=band_label or None)
        if threshold is not None:
            ax.axhline(threshold, color="#555555", linewidth=0.9, linestyle=":", label=threshold_label or None)
        for i, (name, xs, ys) in enumerate(series):
            pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=short_label(name, 24), linewidth=1.6,
                        markersize=5, **style(i))
        ax.set_xscale("log")
        lrs = sorted({x for _, xs, _ in series for x in xs})
        ax.set_xticks(lrs, [sci(x) for x in lrs])  # the grid's own values, "5e-4" (no mathtext)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.08)
        top = max([y for _, _, ys in series for y in ys if y is not None] + [0])
        if integer and top >= SYMLOG_FROM:
            # counts from 0 to hundreds: a linear axis flattens the small ones (1 and 6 look like 0
            # next to 325), so 0..1 linear and logarithmic above, with plain tick labels
            ax.set_yscale("symlog", linthresh=1, linscale=0.5)
            ticks = [0, 1] + [10 ** e for e in range(1, int(math.log10(top)) + 2)]
            ax.set_yticks(ticks, [str(t) for t in ticks])
            ax.set_ylim(-0.2, top * 1.6)
            ax.set_ylabel(f"{ylabel}\n(log scale above 1)")
        elif integer:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(-0.05 * max(1, top), max(1, top) * 1.08)
        elif threshold is not None or band is not None:  # a cosine: its whole range
            ax.set_ylim(0, 1.02)
        if title:
            ax.set_title(title, loc="left")
        if series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7)
        return to_svg(fig, desc=f"{ylabel} versus learning rate per method")


# ---- safety -----------------------------------------------------------------------------
def rate_intervals(rows: list[tuple[str, float | None, Sequence[float] | None, float | None, Sequence[float] | None]],
                   *, xlabel: str = "rate") -> str:
    """Refusal rate (point, 95 % interval) of base and each tuned model; optional second metric
    (over-refusal on benign prompts) as a second marker. rows: (name, rate, ci, rate2, ci2)."""
    with plt.rc_context(RC):
        fig = new_figure(7.0, 0.9 + 0.38 * max(1, len(rows)))
        ax = fig.add_subplot()
        has2 = any(r[3] is not None for r in rows)
        for i, (_name, rate, ci, rate2, ci2) in enumerate(rows):
            y = i
            if rate is not None:
                lo, hi = (ci or (rate, rate))
                ax.errorbar([rate * 100], [y - (0.12 if has2 else 0)], xerr=[[max(0.0, (rate - lo) * 100)],
                                                                          [max(0.0, (hi - rate) * 100)]],
                            fmt="o", color=OKABE_ITO[0], capsize=3, markersize=5,
                            label="refusal (harmful prompts)" if i == 0 else None)
            if rate2 is not None:
                lo, hi = (ci2 or (rate2, rate2))
                ax.errorbar([rate2 * 100], [y + 0.12], xerr=[[max(0.0, (rate2 - lo) * 100)],
                                                             [max(0.0, (hi - rate2) * 100)]],
                            fmt="s", color=OKABE_ITO[1], capsize=3, markersize=4,
                            label="over-refusal (benign prompts)" if i == 0 or not any(
                                r[3] is not None for r in rows[:i]) else None)
        ax.set_yticks(range(len(rows)), [short_label(r[0], 30) for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(-2, 102)
        ax.set_xlabel(xlabel + " (%), 95% Wilson interval")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, fontsize=7,
                  borderaxespad=0.2)
        return to_svg(fig, desc="Refusal rates with 95% intervals, base and tuned models")


def category_bars(categories: list[str], series: list[tuple[str, list[float | None], list[Sequence[float] | None]]],
                  *, ylabel: str = "refusal rate (%)", title: str = "") -> str:
    """Grouped bars: one group per category, one bar per model, with 95 % intervals."""
    import numpy as np

    with plt.rc_context(RC):
        fig = new_figure(7.0, 3.2)
        ax = fig.add_subplot()
        n = max(1, len(series))
        width = 0.8 / n
        x = np.arange(len(categories))
        for i, (name, rates, cis) in enumerate(series):
            vals = [np.nan if r is None else r * 100 for r in rates]
            err_lo = [0 if (r is None or c is None) else max(0.0, (r - c[0]) * 100) for r, c in zip(rates, cis, strict=False)]
            err_hi = [0 if (r is None or c is None) else max(0.0, (c[1] - r) * 100) for r, c in zip(rates, cis, strict=False)]
            st = style(i)
            bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, yerr=[err_lo, err_hi], color=st["color"],
                          label=short_label(name), capsize=2, error_kw={"elinewidth": 0.7, "ecolor": "#444444"},
                          edgecolor="white", linewidth=0.3)
            # a coloured cap at each value, so that a 0 % bar still shows whose it is
            ax.hlines(vals, [b.get_x() for b in bars], [b.get_x() + b.get_width() for b in bars],
                      colors=st["color"], linewidth=2.5)
        ax.set_xticks(x, [short_label(c, 16) for c in categories], rotation=30 if len(categories) > 5 else 0,
                      ha="right" if len(categories) > 5 else "center")
        ax.set_ylim(0, 105)
        ax.set_xlabel("prompt category")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        return to_svg(fig, desc=f"{ylabel} per category")


# ---- screens of many adapters ------------------------------------------------------------
def histogram(values: Sequence[float], *, xlabel: str, integer: bool = False, bins: int = 30,
              title: str = "") -> str:
    """How many adapters have each value (one bar per integer with ``integer``, else ``bins`` bins)."""
    import numpy as np

    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    with plt.rc_context(RC):
        fig = new_figure(5.0, 2.8)
        ax = fig.add_subplot()
        if vals.size:
            if integer:
                lo, hi = int(vals.min()), int(vals.max())
                step = max(1, math.ceil((hi - lo + 1) / 60))
                edges = np.arange(lo - 0.5, hi + step + 0.5, step)
            else:
                edges = bins
            ax.hist(vals, bins=edges, color=OKABE_ITO[0], edgecolor="white", linewidth=0.4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("adapters")
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if integer:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            ax.set_title(title, loc="left")
        return to_svg(fig, desc=f"Distribution over the adapters of {xlabel}")


def scatter(groups: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
            title: str = "", log_x: bool = False, width: float = 5.0, height: float = 2.8, marker_size: float = 22,
            alpha: float = 1.0, what: str = "point") -> str:
    """Points in groups, one colour and marker per group (e.g. a fine-tuning method; one unnamed
    group for a screen's adapters). Points with a missing or non-finite coordinate, or x <= 0 on a
    log axis, are left out; the legend names the groups when there is more than one."""
    with plt.rc_context(RC):
        fig = new_figure(width, height)
        ax = fig.add_subplot()
        shown = 0
        for i, (name, xs, ys) in enumerate(groups):
            pts = [(x, y) for x, y in zip(xs, ys, strict=False)
                   if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)]
            if not pts:
                continue
            st = style(i)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=short_label(name, 24) if name else None,
                       color=st["color"], marker=st["marker"], s=marker_size, alpha=alpha, edgecolors="none")
            shown += len(pts)
        if log_x and shown:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, loc="left")
        if sum(1 for g in groups if g[0]) > 1:
            ax.legend(loc="best", frameon=False, fontsize=6)
        return to_svg(fig, desc=f"{ylabel} against {xlabel}, one {what} each")
