"""Exceptions the library raises for problems the user can fix.

The CLI turns every ``LoraAuditError`` into ``Error: <message>`` and a non-zero exit code,
without a traceback. Anything else is a bug in lora-audit and is reported as such.
"""


class LoraAuditError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""

    exit_code = 1


class InputError(LoraAuditError):
    """A path, file or option the user gave is missing, malformed or unsupported."""


class FormatError(InputError):
    """A checkpoint or data file could not be read (truncated, corrupted, unknown layout)."""


class ShapeMismatchError(InputError):
    """An adapter or tuned checkpoint does not fit the base model."""


class DeviceError(LoraAuditError):
    """The requested device is unavailable or ran out of memory."""
