"""What every command shares: options with one meaning everywhere (``--json PATH``, ``--overwrite``,
``--device``, ``--seed``, ``--k``, ``--epsilon``), safe printing, result output and exit codes.

- ``echo``: everything the CLI prints goes through ``lora_audit.text.printable``: names from
  checkpoints cannot move the cursor, clear the screen or reorder text.
- ``--json PATH``: writes the command's result JSON there (``-`` prints it to stdout); checked
  before any work (``check_outputs``), never over a file lora-audit did not write.
- Exit codes: ``lora_audit.errors`` (0 ok, 1 error, 2 usage, 3 gate tripped, 4 incomplete).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import click

from ..errors import EXIT_INCOMPLETE, EXIT_OK, LoraAuditError, OutputError
from ..text import printable


def echo(text: Any = "", *, err: bool = False) -> None:
    """click.echo with every control, bidi and invisible character shown as an escape."""
    click.echo(printable(text, multiline=True), err=err)


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")(f)


def seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help="Random seed (results are reproducible).")(f)


def overwrite_option(f):
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing output folder, if an earlier lora-audit run wrote it "
                             "(folders lora-audit did not write are never replaced).")(f)


def file_path(ctx, param, value):
    """Click callback for an output file option: refuse a folder (usage error); the rest of the
    checks (writable, not replacing what the user owns) run in the command (``check_paths``)."""
    if value is not None and value != "-" and Path(value).expanduser().is_dir():
        raise click.BadParameter(f"{value} is a folder; give a file name", ctx=ctx, param=param)
    return value


def json_option(what: str = "the result"):
    """``--json PATH``: the same meaning in every command."""
    return click.option("--json", "json_path", default=None, metavar="PATH", callback=file_path,
                        help=f"Write {what} as JSON to PATH (atomically, after success; '-' prints it to stdout).")


def chat_template_option(f):
    return click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Jinja chat template file, for models whose tokenizer has none.")(f)


def max_prompt_chars_option(f):
    return click.option("--max-prompt-chars", type=click.IntRange(min=1), default=None,
                        help="Refuse prompt files with a prompt longer than this [default: 16000 characters].")(f)


def k_option(f):
    return click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True,
                        help="How many top singular vectors of each tuned matrix to examine.")(f)


def epsilon_option(f):
    return click.option("--epsilon", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.5,
                        show_default=True,
                        help="Intruder threshold: a direction is an intruder if max |cos| < epsilon.")(f)


def check_paths(*, files: Iterable[str | os.PathLike | None] = (), folders: Iterable[str | os.PathLike | None] = (),
                inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> None:
    """Before any work: every output can be written without replacing something the user owns,
    none is an input or inside one, no two collide (``-``, stdout, is not a path)."""
    from ..io import check_output_dir, check_output_file, check_outputs

    files = [f for f in files if f is not None and str(f) != "-"]
    folders = [d for d in folders if d is not None]
    check_outputs(files + folders, inputs)
    for f in files:
        check_output_file(f)
    for d in folders:
        check_output_dir(d, overwrite=overwrite)


def write_json_output(path: str | os.PathLike | None, obj: Any) -> Path | None:
    """Write a result JSON to ``path`` (``-``: stdout). When the write fails late (disk full,
    folder removed meanwhile), the result is kept in a temporary file and the error says where."""
    from ..io import atomic_write_json, json_text

    if path is None:
        return None
    data = obj.to_json() if hasattr(obj, "to_json") else obj
    if str(path) == "-":
        click.echo(json_text(data), nl=False)
        return None
    try:
        return atomic_write_json(path, data)
    except OSError as e:
        fd, keep = tempfile.mkstemp(prefix="lora-audit-result.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json_text(data))
        raise OutputError(f"{path}: could not be written ({e.strerror or e}); the result was saved to {keep}") \
            from None


def exit_status(*, incomplete: bool = False) -> None:
    """End the command with the exit code its results call for (4 when incomplete)."""
    code = EXIT_INCOMPLETE if incomplete else EXIT_OK
    if code != EXIT_OK:
        raise click.exceptions.Exit(code)


def user_errors(f):
    """Turn library errors into click errors so CliRunner sees exit code 1 and 'Error: ...'.

    (``lora_audit.cli.main`` does the same for the console script; CliRunner calls the
    commands without it.)
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except LoraAuditError as e:
            raise click.ClickException(printable(str(e), multiline=True)) from None
        except (RuntimeError, MemoryError) as e:
            from ..device import is_oom

            if is_oom(e):
                raise click.ClickException("out of memory on the device. Try --device cpu, a smaller "
                                           "--batch-size, or fewer models per run.") from None
            raise

    return wrapper
