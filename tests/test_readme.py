"""The README claims what the tool does: its usage blocks are the real --help (regenerate them with
``make readme``), and every command has one."""

from __future__ import annotations

from lora_audit.cli import COMMANDS

from .readme_usage import README, commands_in, render


def test_readme_help_blocks_match_the_commands():
    import difflib

    text = README.read_text(encoding="utf-8")
    new = render(text)
    diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "--help", n=1))
    assert new == text, f"README usage blocks differ from --help (run `make readme`):\n{diff}"


def test_every_command_has_its_help_in_the_readme():
    documented = {c.split()[0] for c in commands_in(README.read_text(encoding="utf-8"))}
    assert set(COMMANDS) <= documented, f"no --help block for {sorted(set(COMMANDS) - documented)}"
