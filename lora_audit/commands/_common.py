"""Options and helpers shared by several commands."""

from __future__ import annotations

import functools

import click

from ..errors import LoraAuditError


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")(f)


def seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help="Random seed (results are reproducible).")(f)


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
            raise click.ClickException(str(e)) from None
        except (RuntimeError, MemoryError) as e:
            from ..device import is_oom

            if is_oom(e):
                raise click.ClickException("out of memory on the device. Try --device cpu, a smaller "
                                           "--batch-size, or fewer models per run.") from None
            raise

    return wrapper
