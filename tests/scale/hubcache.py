"""A local Hugging Face hub cache built on disk in huggingface_hub's own layout, for offline tests:

    <cache>/models--ORG--NAME/blobs/<sha256 of the file>
    <cache>/models--ORG--NAME/snapshots/<40-hex commit>/<file> -> ../../blobs/<sha256>
    <cache>/models--ORG--NAME/refs/<branch or tag>   (a file holding the commit sha)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(cache: Path, repo_id: str, folder: Path, *, commit: str | None = None,
                 refs: tuple[str, ...] = ()) -> str:
    """Put the files of ``folder`` into ``cache`` as one commit of ``repo_id`` (blobs shared by content,
    snapshot files symlinked into them), point ``refs`` at it; return the commit sha."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
        commit = h.hexdigest()
    snap = repo / "snapshots" / commit
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        r = repo / "refs" / ref
        r.parent.mkdir(parents=True, exist_ok=True)
        r.write_text(commit)
    return commit
