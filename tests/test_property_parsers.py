"""Property-based tests (hypothesis) of the parsers of untrusted input in screens and safety
evaluations: screen manifests, the screen store's index lines, prompt files (JSONL, JSON, CSV,
TSV, TXT) and task-folder YAML. Whatever the bytes, the parser gives a result or a clean
``LoraAuditError``, never another exception (which the CLI would report as a bug)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_audit.errors import LoraAuditError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that break parsers: separators, quotes, controls, bidi, BOM, surrogate-free unicode.
_NASTY = st.sampled_from(list("\t\r\n\x00\x0b\x0c\x1b\x85\u2028\u202e\ufeff\"',#/\\.:= {}[]%") + ["é", "日", "..", "~"])
NASTY_TEXT = st.lists(st.one_of(_NASTY, st.text(max_size=5)), max_size=40).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | NASTY_TEXT, lambda c: st.lists(c, max_size=4) | st.dictionaries(NASTY_TEXT, c, max_size=4),
                    max_leaves=15)
CONTENT = st.one_of(st.binary(max_size=300), NASTY_TEXT.map(lambda t: t.encode("utf-8")),
                    JSON.map(lambda v: json.dumps(v).encode()),
                    st.lists(JSON, max_size=5).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()))


def _file(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


@FAST
@given(data=CONTENT)
def test_a_manifest_is_read_or_refused_cleanly(data):
    from lora_audit.screen.discovery import read_manifest, unique

    with tempfile.TemporaryDirectory() as d:
        try:
            entries = read_manifest(_file(Path(d), "m.txt", data))
        except LoraAuditError:
            return
        kept, warnings = unique(entries)
        assert len(kept) <= len(entries) and all(isinstance(w, str) for w in warnings)
        assert all(e.adapter and "\t" not in e.adapter for e in entries)


_INDEX_VALUE = st.one_of(JSON, st.integers(min_value=-2**70, max_value=2**110), st.sampled_from(
    ["..", "../x", "/etc/passwd", "", ".lock", "part-x.jsonl", "\udcff", 10**30, -1, 0, 2**63]))
_FIELDS = ("adapter", "fingerprint", "status", "shard", "line", "offset", "length", "sha256")
# An index line: the real entry with some fields forged, or a line that is not an entry at all.
INDEX_LINE = st.one_of(st.dictionaries(st.sampled_from(_FIELDS), _INDEX_VALUE, min_size=1, max_size=3),
                       st.binary(max_size=120).filter(lambda b: b"\n" not in b))


@FAST
@given(lines=st.lists(INDEX_LINE, max_size=6), torn=st.binary(max_size=20))
def test_store_index_lines_are_used_or_skipped_never_a_crash(lines, torn):
    """Forged index lines (the real entry with huge or negative offsets, shard names with '..', wrong
    types; bytes that are not UTF-8) after one real record: the store opens, skips what is wrong
    with a warning, reads or refuses each entry cleanly, and still appends."""
    from lora_audit.results.screen import ScreenRecord, ScreenSetup
    from lora_audit.screen.store import ScreenStore

    setup = ScreenSetup(base="b", base_fingerprint="sha256:0", k=10, epsilon=0.5, epsilon_sweep=[0.5])
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "s"
        record = ScreenRecord(adapter="real", status="failed", error="x", fingerprint="sha256:1").to_json()
        with ScreenStore.open(folder, setup) as store:
            store.append(record)
        real = json.loads((folder / "index.jsonl").read_text())
        raw = [line if isinstance(line, bytes) else json.dumps({**real, **line}).encode() for line in lines]
        with open(folder / "index.jsonl", "ab") as fh:
            fh.write(b"".join(line + b"\n" for line in raw) + torn.replace(b"\n", b""))
        with ScreenStore.open(folder, setup, resume=True) as store:
            for entry in list(store.latest.values()):
                if store.verified(entry):
                    store.read(entry)
                else:
                    try:
                        store.read(entry)
                    except LoraAuditError:
                        pass
            store.append(record)
        with ScreenStore.open(folder, setup, resume=True) as store:
            assert store.read(store.latest["real"]).adapter == "real"


@FAST
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]), data=CONTENT)
def test_a_prompt_file_is_read_or_refused_cleanly(suffix, data):
    from lora_audit.safety.prompts import load_prompts

    with tempfile.TemporaryDirectory() as d:
        try:
            ps = load_prompts(_file(Path(d), "p" + suffix, data))
        except LoraAuditError:
            return
        assert len(ps) > 0 and all(isinstance(p.prompt, str) and p.prompt.strip() for p in ps.prompts)


YAML_SCALAR = st.one_of(NASTY_TEXT, st.integers(), st.sampled_from(
    ["!function utils.f", "!!python/name:os.system", "{{ x.__class__ }}", "&a [*a]", "*b", "[", "{", "|", "? x"]))


@FAST
@given(lines=st.lists(st.tuples(st.sampled_from(["task", "include", "doc_to_text", "metric_list", "class", "group",
                                                   "use_prompt", "dataset_kwargs", "x"]), YAML_SCALAR), max_size=6),
       raw=st.binary(max_size=80))
def test_a_task_folder_is_inspected_or_refused_cleanly(lines, raw):
    from lora_audit.safety.task_code import inspect_task_dir

    with tempfile.TemporaryDirectory() as d:
        text = "".join(f"{k}: {v}\n" for k, v in lines)
        _file(Path(d), "t.yaml", text.encode("utf-8", "backslashreplace") + raw)
        try:
            report = inspect_task_dir(d)
        except LoraAuditError:
            return
        assert not report.runs_code
