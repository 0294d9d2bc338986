"""The README's usage blocks are the commands' own ``--help``, generated, never written by hand.

A block in README.md looks like::

    <!-- help: spectrum -->
    <details><summary><code>lora-audit spectrum --help</code></summary>

    ```text
    (the help text)
    ```
    </details>
    <!-- /help -->

``python -m tests.readme_usage`` (``make readme``) rewrites every block from the current
``--help``; ``tests/test_readme.py`` fails when one differs, so the README never drifts.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- help: (?P<cmd>[a-z -]+?) -->\n.*?<!-- /help -->", re.S)
WIDTH = 100


def help_text(command: str) -> str:
    """``lora-audit COMMAND --help`` as a terminal WIDTH columns wide shows it."""
    from click.testing import CliRunner

    from lora_audit.cli import cli

    r = CliRunner().invoke(cli, [*command.split(), "--help"], prog_name="lora-audit", terminal_width=WIDTH)
    if r.exit_code != 0:
        raise RuntimeError(f"lora-audit {command} --help failed: {r.output}")
    return r.output.rstrip() + "\n"


def block(command: str) -> str:
    return (f"<!-- help: {command} -->\n<details><summary><code>lora-audit {command} --help</code></summary>\n\n"
            f"```text\n{help_text(command)}```\n</details>\n<!-- /help -->")


def render(text: str) -> str:
    """The README text with every help block regenerated."""
    return BLOCK.sub(lambda m: block(m["cmd"]), text)


def commands_in(text: str) -> list[str]:
    return [m["cmd"] for m in BLOCK.finditer(text)]


if __name__ == "__main__":
    old = README.read_text(encoding="utf-8")
    new = render(old)
    if new != old:
        README.write_text(new, encoding="utf-8")
        print(f"updated {len(commands_in(new))} help blocks in {README}")
    else:
        print("README help blocks are up to date")
    sys.exit(0)
