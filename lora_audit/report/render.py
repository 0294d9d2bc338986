"""Rendering: the template contexts through jinja2 into HTML or Markdown text."""

from __future__ import annotations

from ..errors import InputError
from .context import html_context, md_context
from .model import ReportData
from .tables import Table, all_tables, fmt_value
from .text import clean, md_escape

FORMATS = ("html", "md")


def environment(fmt: str):
    """The jinja2 environment of the report templates (autoescape for html) with their filters."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("lora_audit.report", "templates"),
                             autoescape=(fmt == "html"), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["clean"] = clean
    env.filters["md"] = md_escape
    env.filters["fmt"] = fmt_value
    return env


def _is_figure(key: str) -> bool:
    return key == "svg" or key.endswith("_svg")


def _trust_figures(ctx: dict) -> None:
    """Mark the SVG figures as markup: matplotlib wrote them from text it escaped itself
    (``figures.to_svg``), so they are inlined as they are. Figures are the string values of the
    "sfig", "safefig" and "scanfig" groups and the values under "svg" / "*_svg" keys of the items in their
    lists and in "studies"; every other string (names, notes) stays escaped."""
    from markupsafe import Markup

    def mark_items(items: list) -> None:
        for item in items:
            if isinstance(item, dict):
                for key, v in item.items():
                    if _is_figure(key) and isinstance(v, str):
                        item[key] = Markup(v)

    for group in ("sfig", "safefig", "scanfig"):
        figs = ctx.get(group) or {}
        for k, v in figs.items():
            if isinstance(v, str):
                figs[k] = Markup(v)
            elif isinstance(v, list):
                mark_items(v)
    mark_items(ctx.get("studies") or [])


def render(data: ReportData, fmt: str = "html", tables: dict[str, Table] | None = None) -> str:
    """The report text in ``fmt`` ("html" or "md"); ``tables`` from ``all_tables(data)`` when the
    caller has them already (they are also exported as CSV)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tables = all_tables(data) if tables is None else tables
    if fmt == "html":
        ctx = html_context(data, tables)
        _trust_figures(ctx)
    else:
        ctx = md_context(data, tables)
    return environment(fmt).get_template(f"report.{fmt}.j2").render(**ctx)
