"""``run_screen`` in this process (``workers=0``): per-adapter results equal to ``spectrum``'s, failures
recorded, the ranking, resuming, and the summary files and report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_audit.errors import InputError
from lora_audit.results import load_result
from lora_audit.results.screen import ScreenResult, ScreenRow, rank_rows
from lora_audit.screen import ScreenConfig, discover, read_manifest, run_screen
from lora_audit.screen import engines as engines_mod
from lora_audit.screen.discovery import Entry

from .conftest import isolated, spectrum_of, stop_driver_after, stored_results

FAST = dict(workers=0, progress=False, detail=0)


def reference_relative_delta_norm(base: Path, adapter: Path) -> float:
    """sqrt(sum ||s B A||_F^2) / sqrt(sum ||W0||_F^2) over the matrices the adapter changes, from the
    files: PEFT (s = lora_alpha / r) or kohya (s = alpha / r)."""
    W = load_file(str(base / "model.safetensors"))
    if adapter.is_dir():
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        t = load_file(str(adapter / "adapter_model.safetensors"))
        mods = {k[len("base_model.model."): -len(".lora_A.weight")] for k in t if k.endswith("lora_A.weight")}
        pairs = [(m, t[f"base_model.model.{m}.lora_B.weight"], t[f"base_model.model.{m}.lora_A.weight"],
                  cfg["lora_alpha"] / cfg["r"]) for m in mods]
    else:
        t = load_file(str(adapter))
        mods = {k[: -len(".lora_down.weight")] for k in t if k.endswith("lora_down.weight")}
        pairs = [(m, t[f"{m}.lora_up.weight"], t[f"{m}.lora_down.weight"], float(t[f"{m}.alpha"]) / t[f"{m}.lora_down.weight"].shape[0])
                 for m in mods]
    num = sum(float((s * B.double() @ A.double()).norm()) ** 2 for _, B, A, s in pairs)
    den = sum(float(W[f"{m}.weight"].double().norm()) ** 2 for m, _, _, _ in pairs)
    return math.sqrt(num / den)


@pytest.fixture(scope="module")
def screened(screen_set, tmp_path_factory, session_cache, session_config):
    base, ads = screen_set
    entries, _ = discover([str(Path(ads["big"]).parent)])
    out = tmp_path_factory.mktemp("screened") / "screen"
    with isolated(session_cache, session_config):
        outcome = run_screen(str(base), entries, out, ScreenConfig(workers=0, progress=False, detail=2))
    return base, ads, entries, out, outcome


def test_each_record_is_what_spectrum_gives(screened):
    base, ads, entries, out, outcome = screened
    records = stored_results(out)
    assert set(records) == {e.adapter for e in entries} and len(entries) == 6
    for e in entries:
        rec = records[e.adapter]
        if e.adapter.endswith("zz-corrupt"):
            continue
        assert rec["status"] == "ok" and rec["error"] == ""
        got = dict(rec["result"])
        got.pop("seconds")
        assert got == spectrum_of(base, e.adapter)


def test_a_corrupt_adapter_is_recorded_and_the_rest_complete(screened):
    base, ads, entries, out, outcome = screened
    records = stored_results(out)
    bad = records[str(ads["corrupt"])]
    assert bad["status"] == "failed" and bad["result"] is None and bad["attempts"] == 1  # the input's fault: not retried
    assert "adapter_model.safetensors: not a readable safetensors file" in bad["error"]
    assert outcome.failed == 1 and outcome.summary.counts == {"adapters": 6, "ok": 5, "failed": 1, "audited_now": 6,
                                                              "skipped_stored": 0}


def test_the_summary_ranks_by_intruders_then_relative_update(screened):
    base, ads, entries, out, outcome = screened
    ref = {}
    for e in entries:
        if not e.adapter.endswith("zz-corrupt"):
            ref[e.adapter] = (spectrum_of(base, e.adapter)["total_intruders"], reference_relative_delta_norm(base, Path(e.path)))
    expected = sorted(ref, key=lambda a: (-ref[a][0], -ref[a][1])) + [str(ads["corrupt"])]
    assert ref[str(ads["tiny1"])][0] == ref[str(ads["tiny2"])][0] == 0  # a tie on intruders: |dW|/|W0| decides
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["adapter"] for r in rows] == expected
    assert [r["position"] for r in rows] == [str(i) for i in range(1, 6)] + [""]
    for r in rows[:5]:
        assert r["status"] == "ok" and r["error"] == "" and int(r["total_intruders"]) == ref[r["adapter"]][0]
        assert float(r["relative_delta_norm"]) == pytest.approx(ref[r["adapter"]][1], rel=1e-5)
    assert rows[5]["status"] == "failed" and rows[5]["total_intruders"] == "" and "not a readable" in rows[5]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora_audit"]["schema"] == "screen"
    assert [a["adapter"] for a in summary["adapters"]] == expected
    assert [(a["status"], a["total_intruders"], a["error"]) for a in summary["adapters"]] == \
        [(r["status"], int(r["total_intruders"]) if r["total_intruders"] else None, r["error"]) for r in rows]
    assert isinstance(load_result(out / "summary.json"), ScreenResult)


def test_report_and_detail_pages(screened):
    base, ads, entries, out, outcome = screened
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count('<a href="detail/00001.html">') >= 1 and 'href="detail/00002.html"' in html
    assert 'href="detail/00003.html"' not in html
    assert sorted(p.name for p in (out / "detail").iterdir()) == [".lora-audit-output", "00001.html", "00002.html"]
    first = outcome.summary.adapters[0].adapter
    assert first.split("/")[-1] in (out / "detail" / "00001.html").read_text()
    assert "<svg" in html  # the distribution figures
    with pytest.raises(InputError, match="writes its own report"):
        from lora_audit.report import build_report

        build_report([out / "summary.json"])


def test_rank_rows_orders_missing_values_last_and_keeps_ties_in_input_order():
    rows = [ScreenRow("a", "a", "ok", total_intruders=2, relative_delta_norm=0.1),
            ScreenRow("f", "f", "failed", error="x"),
            ScreenRow("b", "b", "ok", total_intruders=2, relative_delta_norm=0.3),
            ScreenRow("c", "c", "ok", total_intruders=5),
            ScreenRow("d", "d", "ok", total_intruders=2, relative_delta_norm=0.1, min_max_cos=0.2),
            ScreenRow("e", "e", "ok", total_intruders=2, relative_delta_norm=0.1, min_max_cos=0.1)]
    ranked = rank_rows(rows)
    assert [r.adapter for r in ranked] == ["c", "b", "e", "d", "a", "f"]
    assert [r.position for r in ranked] == [1, 2, 3, 4, 5, None]


def test_a_summary_written_with_the_old_name_drift_is_read():
    """relative_delta_norm was called "drift" in screen files, a name the spectrum JSON uses for
    1 - lowest max|cos|; old summaries still read, into the new field."""
    from lora_audit.results.screen import ScreenResult

    old = {"lora_audit": {"schema": "screen", "schema_version": 1}, "base": "b", "k": 4, "epsilon": 0.5,
           "ranked_by": ["total_intruders desc", "drift desc", "min_max_cos asc"],
           "adapters": [{"adapter": "a", "name": "a", "status": "ok", "total_intruders": 3, "drift": 0.25}]}
    (row,) = ScreenResult.from_json(old).adapters
    assert row.relative_delta_norm == 0.25 and not hasattr(row, "drift")
    new = ScreenResult.from_json({**old, "adapters": [{**old["adapters"][0], "relative_delta_norm": 0.5}]})
    assert new.adapters[0].relative_delta_norm == 0.5  # the new name wins when a file has both
    assert "drift" not in ScreenResult(base="b", k=4, epsilon=0.5, adapters=[row]).to_csv().splitlines()[0]


def test_the_ranking_position_is_not_called_rank():
    """A screen row's place in the ranking is "position" ("rank" means a LoRA rank in study.json and
    the spectrum JSON); a row written as "rank" still reads."""
    from lora_audit.results.screen import ScreenResult

    old = {"lora_audit": {"schema": "screen", "schema_version": 1}, "base": "b", "k": 4, "epsilon": 0.5,
           "adapters": [{"adapter": "a", "name": "a", "status": "ok", "total_intruders": 3, "rank": 1}]}
    result = ScreenResult.from_json(old)
    assert result.adapters[0].position == 1
    assert "rank" not in result.to_json()["adapters"][0] and "rank" not in result.csv_columns()


def test_interrupted_screen_resumes_without_recomputing(screen_set, tmp_path, monkeypatch):
    base, ads = screen_set
    entries = [Entry(str(ads[k]), str(ads[k])) for k in ("big", "mid", "tiny1", "tiny2", "kohya")]
    out = tmp_path / "s"
    with monkeypatch.context() as m:
        stop_driver_after(m, 2)  # the driver stops while the third adapter is in flight
        with pytest.raises(KeyboardInterrupt):
            run_screen(str(base), entries, out, ScreenConfig(**FAST))
    first = (out / "index.jsonl").read_text().splitlines()
    assert len(first) == 2 and not (out / "summary.csv").exists()

    audited = []
    real_audit = engines_mod.audit_adapter

    def spy(spec, job, **kw):
        audited.append(job.adapter)
        return real_audit(spec, job, **kw)

    monkeypatch.setattr(engines_mod, "audit_adapter", spy)
    outcome = run_screen(str(base), entries, out, ScreenConfig(resume=True, **FAST))
    done = [json.loads(x)["adapter"] for x in first]
    assert sorted(audited) == sorted(e.adapter for e in entries if e.adapter not in done)
    index = (out / "index.jsonl").read_text().splitlines()
    assert index[:2] == first and len(index) == 5  # the stored records were kept, not rewritten
    assert outcome.summary.counts["skipped_stored"] == 2 and outcome.failed == 0

    audited.clear()  # an adapter whose files changed is audited again; the others are not
    cfg = Path(ads["tiny1"]) / "adapter_config.json"
    cfg.write_text(cfg.read_text() + "\n")
    run_screen(str(base), entries, out, ScreenConfig(resume=True, **FAST))
    assert audited == [str(ads["tiny1"])]


def test_failed_adapters_are_kept_unless_retried(screen_set, tmp_path, monkeypatch):
    base, ads = screen_set
    entries = [Entry(str(ads["tiny1"]), str(ads["tiny1"])), Entry("bad", str(ads["corrupt"]), "the bad one")]
    out = tmp_path / "s"
    run_screen(str(base), entries, out, ScreenConfig(**FAST))
    audited = []
    real_audit = engines_mod.audit_adapter
    monkeypatch.setattr(engines_mod, "audit_adapter", lambda spec, job, **kw: audited.append(job.adapter) or
                        real_audit(spec, job, **kw))
    outcome = run_screen(str(base), entries, out, ScreenConfig(resume=True, **FAST))
    assert audited == [] and outcome.failed == 1
    outcome = run_screen(str(base), entries, out, ScreenConfig(resume=True, retry_failed=True, **FAST))
    assert audited == ["bad"] and outcome.summary.adapters[-1].name == "the bad one"


def test_unexpected_errors_are_retried_once_then_recorded(screen_set, tmp_path, monkeypatch):
    base, ads = screen_set
    calls = []
    real_audit = engines_mod.audit_adapter

    def flaky(spec, job, **kw):
        calls.append((job.adapter, kw["attempt"]))
        if job.adapter == "always" or (job.adapter == "once" and kw["attempt"] == 1):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_audit(spec, job, **kw)

    monkeypatch.setattr(engines_mod, "audit_adapter", flaky)
    entries = [Entry("once", str(ads["tiny1"])), Entry("always", str(ads["tiny2"]))]
    outcome = run_screen(str(base), entries, tmp_path / "s", ScreenConfig(**FAST))
    assert calls == [("once", 1), ("once", 2), ("always", 1), ("always", 2)]
    rec = stored_results(tmp_path / "s")
    assert rec["once"]["status"] == "ok" and rec["once"]["attempts"] == 2
    assert rec["always"]["status"] == "failed" and rec["always"]["attempts"] == 2
    assert rec["always"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert outcome.failed == 1


def test_names_from_a_manifest_are_escaped_in_the_report(screen_set, tmp_path):
    base, ads = screen_set
    evil = '<script>alert(1)</script>\x1b[2J"all clean"'
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{ads['tiny1']}\t{evil}\n{ads['corrupt']}\t<img src=x onerror=alert(2)>\n")
    run_screen(str(base), read_manifest(manifest), tmp_path / "s", ScreenConfig(workers=0, progress=False, detail=1))
    html = (tmp_path / "s" / "report.html").read_text()
    assert "<script" not in html and "<img" not in html and "\x1b" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J&#34;all clean&#34;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    detail = (tmp_path / "s" / "detail" / "00001.html").read_text()
    assert "<script" not in detail and "&lt;script&gt;" in detail


def test_bad_settings_and_bases_fail_before_anything_is_written(screen_set, tmp_path):
    base, ads = screen_set
    entries = [Entry(str(ads["tiny1"]), str(ads["tiny1"]))]
    out = tmp_path / "s"
    with pytest.raises(InputError, match="k must be an integer >= 1"):
        run_screen(str(base), entries, out, ScreenConfig(k=0, **FAST))
    with pytest.raises(InputError, match="not a full model"):
        run_screen(str(ads["tiny1"]), entries, out, ScreenConfig(**FAST))
    with pytest.raises(InputError, match="--spectra object-store needs --engine ray"):
        run_screen(str(base), entries, out, ScreenConfig(spectra="object-store", **FAST))
    with pytest.raises(InputError, match="no adapters to screen"):
        run_screen(str(base), [], out, ScreenConfig(**FAST))
    assert not out.exists()


def test_a_result_json_cannot_hold_is_recorded_as_failed(screen_set, tmp_path, monkeypatch):
    """JSON has no NaN: a result holding one becomes a failed record instead of stopping the store."""
    from lora_audit.results.spectrum import MatrixResult, SpectrumResult, TunedResult
    from lora_audit.spectral import api

    base, ads = screen_set
    bad = TunedResult(tuned="x", matrices=[MatrixResult(name="m.weight", shape=[2, 2], max_cos=[0.1], intruders=1,
                                                        delta_norm=float("nan"))])
    monkeypatch.setattr(api, "run_spectrum", lambda *a, **k: SpectrumResult(base="b", k=1, epsilon=0.5, results=[bad]))
    outcome = run_screen(str(base), [Entry("x", str(ads["tiny1"]))], tmp_path / "s", ScreenConfig(**FAST))
    rec = stored_results(tmp_path / "s")["x"]
    assert rec["status"] == "failed" and "non-finite numbers" in rec["error"] and outcome.failed == 1
