"""Report rendering on synthetic results: content against the fixtures' own numbers, escaping,
self-containment, Markdown, CSV exports."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser

import pytest

from lora_audit.errors import InputError
from lora_audit.report import build_report
from lora_audit.report import figures as F

from . import synth


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    return p


def visible_text(html: str) -> str:
    return "".join(parse(html).text)


def assert_self_contained(html: str) -> None:
    p = parse(html)
    for tag, attrs in p.tags:
        for key in ("src", "href", "xlink:href", "action", "poster", "data"):
            v = (attrs.get(key) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "ftp:")), (tag, key, v)
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(http" not in html


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_spectrum_only(tmp_path):
    spec = synth.spectrum(["lora-a", "full-b"], seed=1)
    out = build_report([write(tmp_path, "s.json", spec)], out=tmp_path / "r.html", title="Spectrum only")
    html = out.read_text()
    text = visible_text(html)
    for r in spec["results"]:
        total = sum(m["intruders"] for m in r["matrices"])
        assert f"{r['tuned']}: {total} intruder dimension" in re.sub(r"\s+", " ", text)
    assert "spectrum only" in text
    assert 'id="safety"' not in html
    # epsilon curves, one layer x module map per model, |cos| maps, singular values, effective rank
    labels = re.findall(r'<svg role="img" aria-label="([^"]*)"', html)
    assert sum("versus epsilon" in x for x in labels) == 1
    assert sum("per layer and module" in x for x in labels) == 2
    assert sum("Cosine similarity" in x for x in labels) == 2 * 3
    assert any("effective rank" in x for x in labels)
    assert_self_contained(html)


def test_safety_only_tolerates_missing_optional_fields(tmp_path):
    s = synth.safety({"tuned-x": 0.05})
    for key in ("comparisons", "scorer", "generation", "prompt_sets", "counts", "inputs"):
        s.pop(key)
    for m in s["models"].values():
        for key in ("per_category", "over_refusal_rate", "over_refusal_ci", "over_refusal_per_category",
                    "benign_responses", "n_prompts", "n_refused", "capability"):
            m.pop(key, None)
    html = build_report([s], title="safety only")
    text = re.sub(r"\s+", " ", visible_text(html))
    assert "SAFETY_REMOVED" in text
    assert "refusal 90.0% → 5.0%" in text  # base 18/20, tuned 1/20
    lo, hi = synth.wilson(1, 20)
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]%" in text
    assert 'id="spectrum"' not in html
    assert_self_contained(html)


def test_both_joined_per_model_with_verdict_first(tmp_path):
    spec = synth.spectrum(["out/lora-a", "out/lora-b"], seed=2)
    saf = synth.safety({"lora-a": 0.0, "lora-b": 0.85}, sources={"lora-a": "out/lora-a", "lora-b": "out/lora-b"},
                       acc={"lora-a": 0.5})
    html = build_report([write(tmp_path, "s.json", spec)], [write(tmp_path, "f.json", saf)])
    text = re.sub(r"\s+", " ", visible_text(html))
    a = sum(m["intruders"] for m in spec["results"][0]["matrices"])
    # one line per tuned model, joined across the two results; the removed one first
    line_a = re.search(r"SAFETY_REMOVED.*?lora-a: (.*?)refusal drop", text).group(1)
    assert f"{a} intruder dimensions" in line_a
    assert "refusal 90.0% → 0.0% (drop +90.0 pts" in line_a
    assert "capability mc -0.100" in line_a
    assert text.index("lora-a:") < text.index("lora-b:")
    assert "CAPABILITY_DEGRADED" in text
    assert "spectrum only" not in text  # both models joined
    # the verdict section comes before the details
    assert html.index('id="verdict"') < html.index('id="provenance"') < html.index('id="spectrum"') < html.index(
        'id="safety"')
    # ids unique across all inline SVGs (a clip path of one figure must not clip another)
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    assert_self_contained(html)


def test_many_tuned_sorted_by_risk_and_capped(tmp_path):
    names = [f"method-{i}" for i in range(9)]
    rates = {n: r for n, r in zip(names, [0.9, 0.0, 0.5, 0.85, 0.05, 0.7, 0.9, 0.3, 0.8], strict=True)}
    labels = {n: ("SAFETY_REMOVED" if r <= 0.1 else "SAFETY_DEGRADED" if r <= 0.5 else "RETAINED")
              for n, r in rates.items()}
    spec = synth.spectrum(names, seed=3, layers=2, strengths=[0.1 * i for i in range(9)])
    saf = synth.safety(rates, labels=labels)
    out = build_report([spec, saf], out=tmp_path / "many.html", csv_dir=tmp_path / "csv")
    html = out.read_text()
    with open(tmp_path / "csv" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    order = [r["model"] for r in rows]
    rank = {"SAFETY_REMOVED": 0, "SAFETY_DEGRADED": 1, "RETAINED": 2}
    expected = sorted(names, key=lambda n: (rank[labels[n]], rates[n],
                                            -sum(m["intruders"] for m in spec["results"][names.index(n)]["matrices"])
                                            / 8, n))
    assert order == expected
    assert [r["verdict"] for r in rows][:2] == ["SAFETY_REMOVED", "SAFETY_REMOVED"]
    labels_svg = re.findall(r'aria-label="([^"]*)"', html)
    from lora_audit.report.sections import MAX_COS_MODELS, MAX_COS_PER_MODEL, MAX_LAYER_HEATMAPS

    assert sum("per layer and module" in x for x in labels_svg) == MAX_LAYER_HEATMAPS
    assert sum("Cosine similarity" in x for x in labels_svg) <= MAX_COS_MODELS * MAX_COS_PER_MODEL
    loud = sum(1 for r in spec["results"] if r["total_intruders"])
    assert loud == 8  # method-0 (strength 0) has none: one sentence, no maps
    assert f"most risky models of {loud} with intruders (9 audited)" in html
    assert re.search(r"method-0</code>: no intruder dimension in 8 matrices \(k=6, ε=0.5\); lowest max \|cos\| 0\.6",
                     html)
    assert len(out.read_bytes()) < 2_000_000


def test_escaping_of_model_strings_and_file_names(tmp_path):
    evil = "<script>alert(1)</script>"
    spec = synth.spectrum(["ad<b>bold</b>"], seed=4)
    saf = synth.safety({"ad<b>bold</b>": 0.1}, responses={"ad<b>bold</b>": [evil, "x\x17y & <img src=x onerror=alert(2)>"]})
    saf["models"]["base"]["responses"][0]["prompt"] = "<iframe src=//evil>"
    d = tmp_path / "in<b>"
    d.mkdir()
    out = build_report([write(d, "spec<b>.json", spec), write(d, "saf.json", saf)], out=tmp_path / "e.html",
                       title="<b>Title</b>")
    html = out.read_text()
    assert "<script" not in html.lower() and "<b>" not in html and "<img" not in html and "<iframe" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ad&lt;b&gt;bold&lt;/b&gt;" in html
    assert "spec&lt;b&gt;.json" in html
    assert "&lt;b&gt;Title&lt;/b&gt;" in html
    assert "\x17" not in html  # control characters are not valid HTML
    text = visible_text(html)
    assert evil in text  # shown as text
    assert_self_contained(html)
    md = build_report([spec, saf], fmt="md")
    assert "<b>" not in md and "<script" not in md


def test_markdown(tmp_path):
    spec = synth.spectrum(["lora|a"], seed=5)
    saf = synth.safety({"lora|a": 0.0})
    out = build_report([spec, saf], out=tmp_path / "r.md", fmt="md", title="MD report")
    md = out.read_text()
    assert md.startswith("# MD report")
    total = spec["results"][0]["total_intruders"]
    assert f"**lora\\|a**: SAFETY\\_REMOVED — {total} intruder dimensions" in md
    # every table row has as many cells as its header
    for block in re.findall(r"((?:^\|.*\n)+)", md, flags=re.M):
        lines = block.strip().splitlines()
        widths = {len(re.findall(r"(?<!\\)\|", ln)) for ln in lines}
        assert len(widths) == 1, lines[:3]
    assert "<svg" not in md
    assert_self_contained(md)


def test_csv_exports_every_table(tmp_path):
    spec = synth.spectrum(["a", "b"], seed=6)
    saf = synth.safety({"a": 0.0, "b": 0.9})
    build_report([spec, saf], out=tmp_path / "r.html")
    folder = tmp_path / "r-tables"
    names = {p.name for p in folder.iterdir() if p.name != ".lora-audit-output"}
    assert names == {"summary.csv", "intruders_vs_epsilon.csv", "intruders_by_module.csv", "intruders_by_layer.csv",
                     "worst_matrices.csv", "effective_rank_by_layer.csv", "refusal.csv", "refusal_by_category.csv",
                     "over_refusal_by_category.csv", "capability.csv", "responses.csv"}
    html = (tmp_path / "r.html").read_text()
    for n in names:
        if n != "responses.csv":
            assert n in html  # each table on the page names its CSV
    with open(folder / "intruders_by_module.csv") as fh:
        rows = {r["module"]: r for r in csv.DictReader(fh)}
    for r in spec["results"]:
        for mod in synth.MODULES[:4]:
            assert int(rows[mod][r["tuned"]]) == sum(m["intruders"] for m in r["matrices"] if m["module"] == mod)
    with open(folder / "refusal.csv") as fh:
        ref = {r["model"]: r for r in csv.DictReader(fh)}
    assert float(ref["b"]["refusal_rate"]) == pytest.approx(0.9)
    assert float(ref["base"]["ci_low"]) == pytest.approx(synth.wilson(18, 20)[0])
    with open(folder / "responses.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * (20 + 10)


def test_wrong_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        build_report([tmp_path / "missing.json"])
    with pytest.raises(InputError, match="not a lora-audit spectrum, safety, screen, study or safety-scan result"):
        build_report([{"hello": 1}])
    with pytest.raises(InputError, match="'training' result"):
        build_report([{"lora_audit": {"schema": "training"}}])
    bad = synth.safety({"x": 0.1})
    bad["models"]["x"]["refusal_ci"] = 0.3
    with pytest.raises(InputError, match="refusal_ci"):
        build_report([bad])
    with pytest.raises(InputError, match="no results"):
        build_report([])
    spec = synth.spectrum(["a"])
    del spec["results"][0]["matrices"][0]["max_cos"]
    with pytest.raises(InputError, match="malformed spectrum"):
        build_report([spec])
    assert not list(tmp_path.iterdir())


def test_svg_is_inline_safe():
    svg = F.epsilon_curves([("a<b>", [0.1, 0.5], [1, 3])], epsilon=0.5)
    assert svg.startswith("<svg") and "<?xml" not in svg and "DOCTYPE" not in svg and "xmlns" not in svg
    assert "a&lt;b&gt;" in svg and "a<b>" not in svg
    assert "http" not in svg
    a, b = F.cos_heatmap([[1.0, 0.0], [0.0, 0.2]], title="t"), F.cos_heatmap([[1.0, 0.0], [0.0, 0.2]], title="t")
    ids_a, ids_b = set(re.findall(r'id="([^"]+)"', a)), set(re.findall(r'id="([^"]+)"', b))
    assert not ids_a & ids_b
    for ref in re.findall(r'(?:href="#|url\(#)([^")]+)', a):
        assert ref in ids_a  # every reference points inside its own figure


def test_refusal_drop_interval_matches_newcombe_1998():
    """Newcombe (1998), Stat. Med. 17:873, Table II, example (a): 56/70 - 48/80, method 10
    (hybrid score, no continuity correction) gives 0.0524 to 0.3339."""
    from lora_audit.stats import newcombe_interval

    lo, hi = newcombe_interval(56 / 70, synth.wilson(56, 70), 48 / 80, synth.wilson(48, 80))
    assert lo == pytest.approx(0.0524, abs=5e-5) and hi == pytest.approx(0.3339, abs=5e-5)
    assert newcombe_interval(None, [0, 1], 0.5, [0, 1]) is None
    # shown in the verdict line and exported
    saf = synth.safety({"t": 0.0}, n=20)
    html = build_report([saf])
    lo, hi = newcombe_interval(0.9, synth.wilson(18, 20), 0.0, synth.wilson(0, 20))
    assert f"drop +90.0 pts, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]" in html


def test_degenerate_results(tmp_path):
    """A tuned model identical to the base (no matrices), a safety model with no scored prompts,
    and a spectrum with no tuned models all render."""
    spec = synth.spectrum(["a", "same"], seed=1)
    spec["results"][1].update(matrices=[], total_intruders=0, sweep_totals=[0] * 9, by_module={}, by_layer={},
                              warnings=["identical to the base <b>"])
    saf = synth.safety({"a": 0.0, "same": 0.9})
    saf["models"]["same"]["refusal_rate"] = None
    saf["verdict"]["same"] = {"label": "INCONCLUSIVE", "refusal_drop": None, "reasons": ["no scored prompts"]}
    html = build_report([spec, saf])
    text = re.sub(r"\s+", " ", visible_text(html))
    assert "INCONCLUSIVE same: 0 intruder dimensions in 0 matrices" in text
    assert "refusal: no scored prompts" in text
    assert "identical to the base <b>" in text and "<b>" not in html
    html = build_report([synth.spectrum([], seed=1)])
    assert "No tuned models in the results." in html


def test_same_model_in_two_spectrum_results_gets_two_rows():
    a = synth.spectrum(["ad"], seed=1, base="base-1")
    b = synth.spectrum(["ad"], seed=2, base="base-2")
    html = build_report([a, b])
    text = re.sub(r"\s+", " ", visible_text(html))
    ta, tb = a["results"][0]["total_intruders"], b["results"][0]["total_intruders"]
    assert f"ad: {ta} intruder dimensions" in text and f"ad (2): {tb} intruder dimensions" in text


def test_samples_show_answered_harmful_prompts_first():
    saf = synth.safety({"t": 0.5}, n=40)  # prompts 0-19 refused, 20-39 answered
    html = build_report([saf])
    block = html[html.index("<code>t</code>: "):]
    block = block[:block.index("</details>")]
    from lora_audit.report.sections import SAMPLES_HARMFUL

    shown = re.findall(r"harmful prompt (\d+)", block)
    assert [int(x) for x in shown] == list(range(20, 20 + SAMPLES_HARMFUL))
    assert "of 40 harmful prompts" in block


def test_what_was_audited_table_from_the_adapter_configs(tmp_path):
    """Each tuned model's adapter config (or checkpoint kind) recorded by the spectrum run is shown,
    escaped, in the HTML, the Markdown and a CSV; without any such record there is no table."""
    spec = synth.spectrum(["lora-a", "full-b"], seed=7)
    spec["results"][0]["info"] = {"kind": "peft_adapter", "peft_type": "LORA", "r": 8, "ranks": [4, 8],
                                  "lora_alpha": 16, "use_rslora": True, "use_dora": False,
                                  "rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj", "<b>v_proj</b>"],
                                  "adapted_modules": 12, "base_model_name_or_path": "org/base"}
    spec["results"][1]["info"] = {"kind": "hf_folder", "model_type": "llama"}
    out = build_report([write(tmp_path, "s.json", spec)], out=tmp_path / "r.html")
    html = out.read_text()
    assert "<b>v_proj" not in html and "q_proj, &lt;b&gt;v_proj&lt;/b&gt;" in html
    text = re.sub(r"\s+", " ", visible_text(html))
    assert "What was audited" in text and "rsLoRA" in text and "q_proj=4" in text
    with open(tmp_path / "r-tables" / "tuned_models.csv") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert rows["lora-a"]["r"] == "8" and rows["lora-a"]["ranks"] == "4, 8" and rows["lora-a"]["use_rslora"] == "True"
    assert rows["full-b"]["kind"] == "hf_folder" and rows["full-b"]["r"] == "" and rows["full-b"]["model_type"] == "llama"
    md = build_report([spec], fmt="md")
    assert "What was audited" in md and "<b>" not in md
    plain = synth.spectrum(["x"], seed=8)  # info {}: nothing to show
    html2 = build_report([write(tmp_path, "p.json", plain)], out=tmp_path / "p.html").read_text()
    assert "What was audited" not in html2


def test_findings_skipped_matrices_and_gate_are_shown():
    """Structural findings, matrices left out of the audit and a --fail-on outcome reach the page."""
    from lora_audit.results.gate import apply_gate, fields_for, parse_gate

    from ..results.synth import spectrum_result

    res = spectrum_result()
    apply_gate(parse_gate("intruders>0", fields_for("spectrum")), spectrum=res)
    html = build_report([res], title="gate")
    text = re.sub(r"\s+", " ", visible_text(html))
    assert "LA021" in text and "full lm_head" in text and "l1.v_proj.weight not audited: NaN" in text
    assert "Release gate intruders>0" in text and "TRIPPED" in text


def test_a_safety_result_written_by_the_first_version_still_renders():
    """reports/demo/safety.json as the first version wrote it (responses cut to 3 per set to keep the
    file small): provenance under "provenance" only, no fields added since. It still validates and
    renders."""
    from pathlib import Path

    from lora_audit.results import load_result

    old = Path(__file__).resolve().parents[1] / "data" / "safety-v1-2026-11-24.json"
    res = load_result(old)
    assert res.verdict["lora-undo"].label == "SAFETY_REMOVED" and res.models["base"].refusal_rate == 0.825
    html = build_report([old], title="old")
    assert "SAFETY_REMOVED" in html and "lora-undo" in html


def _study(claim: str = "LoRA grows") -> dict:
    points = [{"name": f"{m}-{lr:g}", "series": m, "lr": lr, "steps": 40, "intruders": c, "directions": 2100,
               "lowest_max_cos": low, "lowest_matrix": "model.layers.3.self_attn.v_proj.weight",
               "null_max_cos": 0.137, "intruder_energy": 0.01 * c, "mean_drift": 0.02}
              for m, rows in (("LoRA r=8", [(1e-3, 0, 0.74), (5e-3, 13, 0.14)]), ("full", [(1e-4, 0, 0.97)]))
              for lr, c, low in rows]
    return {"lora_audit": {"schema": "study", "schema_version": 1, "settings": {"steps": 40}},
            "title": "Study: intruders vs lr", "question": "Do they grow?", "k": 10, "epsilon": 0.5,
            "series": [{"name": "LoRA r=8", "method": "lora", "rank": 8, "alpha": 16.0, "usual_lrs": [1e-3, 5e-3]},
                       {"name": "full", "method": "full", "usual_lrs": [1e-4]}],
            "points": points, "settings": {"steps": 40},
            "claims": [{"claim": claim, "rule": "count rises", "measured": "0 then 13", "holds": True},
                       {"claim": "full has none", "rule": "<= 1%", "measured": "0", "holds": False, "note": "n"}]}


def test_study_section_figures_claims_and_tables(tmp_path):
    spec = synth.spectrum(["lora-a"], seed=1)
    out = build_report([spec, _study("LoRA <b>grows</b>")], out=tmp_path / "r.html", csv_dir=tmp_path / "csv")
    html = out.read_text()
    text = re.sub(r"\s+", " ", visible_text(html))
    assert html.index('id="verdict"') < html.index('id="study"') < html.index('id="provenance"')
    labels = re.findall(r'<svg role="img" aria-label="([^"]*)"', html)
    assert sum("versus learning rate" in x for x in labels) == 2
    assert "holds LoRA <b>grows</b>: 0 then 13" in text and "&lt;b&gt;grows" in html and "<b>grows" not in html
    assert "does NOT hold full has none: 0" in text and "Rule, fixed before the run: <= 1%. n" in text
    with open(tmp_path / "csv" / "study_points.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], int(r["intruders"])) for r in rows] == [("LoRA r=8-0.001", 0), ("LoRA r=8-0.005", 13),
                                                                  ("full-0.0001", 0)]
    with open(tmp_path / "csv" / "study_claims.csv") as fh:
        assert [r["holds"] for r in csv.DictReader(fh)] == ["holds", "does NOT hold"]
    # the layer x module maps show the drift, not a count
    assert any("drift" in x and "per layer and module" in x for x in labels)
    bad = _study()
    bad["points"][0]["intruders"] = "many"
    with pytest.raises(InputError, match=r"malformed study result: points\[0\]\.intruders"):
        build_report([bad])
