"""Exceptions the library raises for problems the user can fix, and the exit codes of the CLI.

The CLI turns every ``LoraAuditError`` into ``Error: <message>`` and a non-zero exit code,
without a traceback. Anything else is a bug in lora-audit and is reported as such. A message
names the file (and the field, line or tensor) that is wrong and what would be accepted.

Exit codes (the same for every command):

    0  success
    1  error: bad input, unreadable file, failed computation; nothing was written
    2  usage: an unknown option or a value of the wrong kind (click's own code)
    3  the --fail-on gate tripped: results were written, and a condition the user set holds
    4  incomplete: results were written, but some matrices or models could not be audited
       (non-finite weights, ...); the JSON and the summary say which and why
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INCOMPLETE = 4


class LoraAuditError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""

    exit_code = EXIT_ERROR


class InputError(LoraAuditError):
    """A path, file or option the user gave is missing, malformed or unsupported."""


class FormatError(InputError):
    """A checkpoint or data file could not be read (truncated, corrupted, unknown layout)."""


class ShapeMismatchError(InputError):
    """An adapter or tuned checkpoint does not fit the base model."""


class OutputError(InputError):
    """An output path cannot be written, or writing it would replace something the user owns."""


class DeviceError(LoraAuditError):
    """The requested device is unavailable or ran out of memory."""
