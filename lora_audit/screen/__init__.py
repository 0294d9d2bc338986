"""Screening: thousands of adapters of one base as one resumable job (``lora-audit screen``).

Rooms: ``discovery`` (what to screen: folders, manifests), ``store`` (the append-only record store
in the screen folder, resumable), ``spectra`` (the base decomposed once and shared by the
workers), ``worker`` (one adapter, exactly as ``lora-audit spectrum`` audits it), ``engines`` (this
process or local worker processes) and ``ray_engine`` (Ray tasks, an optional extra),
``summary`` (ranking, summary.csv/json, report.html), ``run`` (the whole job).
"""

from .discovery import Entry, discover, read_manifest
from .run import ScreenConfig, ScreenOutcome, run_screen

__all__ = ["Entry", "discover", "read_manifest", "ScreenConfig", "ScreenOutcome", "run_screen"]
