"""The HTML report of a screen (``lora-audit screen``): one page for every adapter of one base.

Like the other reports: inline CSS and SVG figures, no network references, and no script. The
ranking can be read several ways without JavaScript: the page carries the same rows pre-sorted by
each ranking key (rank, largest relative update |dW|/|W0|, lowest similarity), and ``summary.csv`` has every column
for a spreadsheet. Names come from untrusted folders and manifests: each is shown through
``text.clean`` and jinja2's autoescape.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

from ..results.screen import OK, ScreenResult, ScreenRow
from . import figures
from .tables import fmt_value

MAX_RANKED_ROWS = 2000  # rows of the full ranking on the page; summary.csv has every adapter
TOP_ROWS = 25  # rows of each pre-sorted view


@dataclass
class _Cell:
    text: str
    href: str | None = None


def _row(r: ScreenRow, links: dict[str, str]) -> list[_Cell]:
    return [_Cell(fmt_value(r.position)), _Cell(r.name, links.get(r.adapter)), _Cell(fmt_value(r.total_intruders)),
            _Cell(fmt_value(r.matrices_audited)), _Cell(fmt_value(r.relative_delta_norm, "f3")),
            _Cell(fmt_value(r.max_relative_delta_norm, "f3")), _Cell(fmt_value(r.min_max_cos, "f3")),
            _Cell(fmt_value(r.seconds, "f2")), _Cell(r.record)]


COLUMNS = ["#", "adapter", "intruders", "matrices", "|dW|/|W0|", "max |dW|/|W0|", "min max|cos|", "seconds",
           "record"]


def _figures(ok: list[ScreenRow], epsilon: float) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if not ok:
        return out
    out.append({"svg": figures.histogram([r.total_intruders for r in ok], integer=True,
                                         xlabel=f"intruder dimensions (ε = {epsilon:g})"),
                "caption": "How many adapters have each total of intruder dimensions over their matrices."})
    norms = [r.relative_delta_norm for r in ok if r.relative_delta_norm is not None]
    if norms:
        out.append({"svg": figures.histogram(norms, xlabel="|dW|/|W0|: ||ΔW||_F / ||W0||_F over changed matrices"),
                    "caption": "How far each adapter moves the matrices it changes, relative to their size."})
        out.append({"svg": figures.scatter([("", [r.relative_delta_norm for r in ok], [r.total_intruders for r in ok])],
                                           log_x=True, xlabel="|dW|/|W0| (log scale)", ylabel="intruder dimensions",
                                           marker_size=10, alpha=0.6, what="adapter"),
                    "caption": "Intruders against the relative update |dW|/|W0|, one point per adapter: intruders "
                               "are not just a large update."})
    return out


def screen_context(result: ScreenResult, *, links: dict[str, str], title: str) -> dict[str, Any]:
    """What the template shows (names raw: the template escapes them)."""
    from .. import __version__
    from ..results import git_hash

    ok = [r for r in result.adapters if r.status == OK]
    failed = [r for r in result.adapters if r.status != OK]
    by_norm = sorted((r for r in ok if r.relative_delta_norm is not None), key=lambda r: -r.relative_delta_norm)[:TOP_ROWS]
    by_cos = sorted((r for r in ok if r.min_max_cos is not None), key=lambda r: r.min_max_cos)[:TOP_ROWS]
    minutes = result.seconds / 60
    audited = result.counts.get("audited_now", 0)
    settings = dict(result.settings)
    return {
        "title": title, "tool_version": __version__, "git_hash": git_hash() or "unknown",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "base": result.base, "k": result.k, "epsilon": f"{result.epsilon:g}", "counts": result.counts,
        "ranked_by": ", then ".join(result.ranked_by),
        "rate": f"{audited / minutes:.0f} adapters per minute" if minutes > 0 and audited else "–",
        "seconds": f"{result.seconds:.1f}", "settings": sorted((k, str(v)) for k, v in settings.items()),
        "columns": COLUMNS, "figures": _figures(ok, result.epsilon),
        "ranked": [_row(r, links) for r in ok[:MAX_RANKED_ROWS]], "ranked_cut": max(0, len(ok) - MAX_RANKED_ROWS),
        "by_norm": [_row(r, links) for r in by_norm], "by_cos": [_row(r, links) for r in by_cos],
        "failed": [(r.name, r.error, r.record) for r in failed], "warnings": list(result.warnings),
        "n_detail": len(links),
    }


def render_screen(result: ScreenResult, *, links: dict[str, str] | None = None, title: str = "lora-audit screen") -> str:
    """The screen's report page. ``links``: adapter -> relative URL of its detail page."""
    from markupsafe import Markup

    from .render import environment

    ctx = screen_context(result, links=links or {}, title=title)
    for f in ctx["figures"]:
        f["svg"] = Markup(f["svg"])  # matplotlib escaped the text in it (figures.to_svg)
    return environment("html").get_template("screen.html.j2").render(**ctx)
