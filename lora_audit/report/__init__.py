"""Reports: spectrum and safety-eval results -> one self-contained HTML file (or Markdown), plus a
CSV export of every table.

    from lora_audit.report import build_report
    build_report(["spectrum.json", "safety.json"], out="reports/run.html", title="My fine-tunes")

The HTML has inline CSS and inline SVG figures, no scripts and no network references: it opens
from disk and can be mailed. Rooms: ``model`` gathers and joins the results, ``tables`` (pandas)
and ``figures`` (matplotlib) draw them, ``sections`` chooses what to show, ``context`` builds the
template contexts, ``render`` runs the templates, ``output`` writes files, ``text`` escapes.
"""

from .model import ReportData, gather
from .output import build_report, default_csv_dir, write_csvs
from .render import FORMATS, render
from .tables import all_tables
from .text import clean, md_escape

__all__ = ["build_report", "render", "gather", "write_csvs", "default_csv_dir", "all_tables", "clean",
           "md_escape", "ReportData", "FORMATS"]
