"""The CLI reference claims what the tool does: docs/cli.md is generated from the code and the
commands' own --help (regenerate it with ``make cli-docs``), it covers every command (the plugins'
included), and the README and the other docs pages point to it instead of pasting help text that drifts
(tests/test_docs.py checks the rest of the README and the site)."""

from __future__ import annotations

from pathlib import Path

from .cli_docs import CLI_MD, commands, commands_in, render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_reference_is_current():
    import difflib

    text = CLI_MD.read_text(encoding="utf-8")
    new = render()
    diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "docs/cli.md", "code", n=1))
    assert new == text, f"docs/cli.md differs from the code (run `make cli-docs`):\n{diff}"


def test_every_command_is_in_the_cli_reference():
    documented = commands_in(CLI_MD.read_text(encoding="utf-8"))
    every = commands()
    assert {"demo", "zoo", "cache", "cache ls", "cache clear", "safety-eval"} <= set(every)
    assert documented == every


def test_the_readme_points_to_the_reference_and_pastes_no_help():
    text = README.read_text(encoding="utf-8")
    assert "docs/cli.md" in text
    assert "<!-- help:" not in text and "Usage: lora-audit" not in text


def test_no_other_docs_page_pastes_help():
    """--help lives in docs/cli.md only, where a test keeps it current; the other pages link to it."""
    for page in sorted(CLI_MD.parent.glob("*.md")):
        if page != CLI_MD:
            assert "Usage: lora-audit" not in page.read_text(encoding="utf-8"), page.name
