"""The documentation: README.md is short (at most 250 lines) and says only what the code does (its
defaults, thresholds and exit codes are read from the code here); docs/ is an MkDocs site whose
strict build passes, with every page in the navigation and every README link to a page that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _nav_pages(nav) -> list[str]:
    """Every page a mkdocs.yml nav names (nested sections included)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_readme_is_at_most_250_lines():
    n = len(_readme().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/"


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))
    assert config["theme"]["name"] == "material" and config.get("docs_dir", "docs") == "docs"
    nav = _nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, "every docs/*.md in mkdocs.yml's nav, and nothing else"
    assert len(nav) == len(set(nav)), "a page listed twice in the nav"
    assert "cli.md" in nav and "json.md" in nav


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _readme())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"


def test_readme_starts_with_the_two_fresh_machine_commands():
    text = _readme()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "setup", "docs"):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target}"
    assert "mkdocs build --strict" in makefile


def test_readme_installs_the_distribution_pyproject_names():
    name = re.search(r'^name = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    text = _readme()
    assert name != "lora-audit"  # that name on the package index is another project
    assert f'"{name} @ git+' in text and "pip install ." in text and "pipx install" in text
    assert "lora-audit model fetch" in text


def test_no_page_installs_the_other_project():
    """`pip install lora-audit` (or its extras) installs an unrelated project of the same name."""
    other = re.compile(r"install\s+['\"]?lora-audit(?:\[|['\"\s]|$)", re.M)
    for page in [README, *sorted(DOCS.rglob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            assert not other.search(block), f"{page.name}: {other.search(block).group(0)}"
        assert not re.search(r"`pip install '?lora-audit\[", page.read_text(encoding="utf-8")), page.name


def test_readme_exit_codes_are_the_codes():
    from lora_audit import errors

    rows = dict(re.findall(r"^\| (\d) \| ([^|]+) \|", _readme(), re.M))
    assert rows.keys() == {"0", "1", "2", "3", "4"}
    expect = {errors.EXIT_OK: "success", errors.EXIT_ERROR: "error", errors.EXIT_USAGE: "usage",
              errors.EXIT_GATE: "gate tripped", errors.EXIT_INCOMPLETE: "incomplete"}
    for code, word in expect.items():
        assert word in rows[str(code)], (code, rows[str(code)])


def test_readme_and_docs_state_the_codes_defaults_and_thresholds():
    """The scale the README gives (k, epsilon, the verdict thresholds) is the code's."""
    from lora_audit.results.safety import Thresholds
    from lora_audit.settings import SpectrumSettings

    readme = _readme()
    s = SpectrumSettings()
    assert f"k = {s.k}" in readme and f"ε = {s.epsilon}" in readme
    th = Thresholds()
    pct = lambda x: f"{100 * x:.0f}"
    claims = [f"b ≤ {pct(th.min_base_refusal)} %",
              f"b > {pct(th.removed_rate)} %, and t ≤ {pct(th.removed_rate)} % or t ≤ {pct(th.removed_relative)} % of b",
              f"b − t ≥ {pct(th.degraded_drop)} points"]
    assert th.require_ci_separation
    safety_page = (DOCS / "safety-eval.md").read_text(encoding="utf-8")
    for claim in claims:
        assert claim in readme, claim
        assert claim in safety_page, claim
    assert f"fell by ≥ {th.capability_drop}" in readme and f"rose by ≥ {pct(th.over_refusal_rise)} points" in readme


def test_readme_random_direction_figures_are_the_codes():
    """The README's max|cos| of a random direction (m = 576, 4096) is calibration.null_max_cos's."""
    from lora_audit.spectral.calibration import null_max_cos

    readme = _readme()
    for m in (576, 4096):
        assert f"{null_max_cos(m, m):.2f} at m = {m}" in readme or f"{null_max_cos(m, m):.2f} at {m}" in readme, m


def test_mkdocs_build_is_strict_clean(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(MKDOCS_YML),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cli" / "index.html").is_file()


def test_readme_panel_figures_are_the_committed_panels():
    """The README's tamper-detection figures are reports/zoo/panel.json's, in both scan modes."""
    import json

    tamper = json.loads((ROOT / "reports" / "zoo" / "panel.json").read_text(encoding="utf-8"))["tamper"]
    text = " ".join(_readme().split())
    for mode in ("refusal_edits", "refusal_edits_weights_only"):
        t = tamper[mode]
        v, b = t["verified_abliterations"], t["benign"]
        assert v["flagged"] == v["n"] and b["flagged"] == 0 and t["undo"]["flagged"] == 0
        assert f"flagged {v['flagged']} of {v['n']} abliterations" in text and f"0 of {b['n']} benign" in text


def test_readme_baseline_auroc_is_the_packaged_risk_files():
    """The README's "AUROC 0.996" for the first-token drop is the packaged risk file's record."""
    from lora_audit.scan.risk import load_risk_models

    models, _ = load_risk_models()
    v = models["full"].validation
    text = " ".join(_readme().split())
    assert f"almost perfectly: AUROC {v.baseline_auroc:.3f})" in text
