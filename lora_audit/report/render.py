"""Rendering: the template contexts through jinja2 into HTML or Markdown text."""

from __future__ import annotations

from ..errors import InputError
from .context import html_context, md_context
from .model import ReportData
from .tables import Table, all_tables, fmt_value
from .text import clean, md_escape

FORMATS = ("html", "md")


def _env(fmt: str):
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("lora_audit.report", "templates"),
                             autoescape=(fmt == "html"), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["clean"] = clean
    env.filters["md"] = md_escape
    env.filters["fmt"] = fmt_value
    return env


def _trust_figures(ctx: dict) -> None:
    """Mark the SVG figures as markup: matplotlib wrote them from text it escaped itself
    (``figures.to_svg``), so they are inlined as they are."""
    from markupsafe import Markup

    for group in ("sfig", "safefig", "scanfig"):
        for k, v in (ctx.get(group) or {}).items():
            if isinstance(v, str):
                ctx[group][k] = Markup(v)
            elif isinstance(v, list):
                for item in v:
                    if isinstance(item, dict) and "svg" in item:
                        item["svg"] = Markup(item["svg"])


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
    return _env(fmt).get_template(f"report.{fmt}.j2").render(**ctx)
