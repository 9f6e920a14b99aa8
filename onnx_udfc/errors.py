"""One exception tree for onnx-udfc; each class carries the CLI exit code it maps to."""


class UdfcError(Exception):
    """Base class of every error the tool reports on one line."""

    exit_code = 4


class UsageError(UdfcError):
    """Bad command-line use: missing file, out-of-range flag, output path equal to input."""

    exit_code = 2


class BadModelError(UdfcError):
    """The input is not a model this tool can read (not ONNX, fails the checker, unsupported dtype)."""

    exit_code = 3


class ValidationFailed(UdfcError):
    """The compressed model differs from the original by more than the requested threshold.

    `report` holds the compression report when one was made (the CLI still writes it).
    """

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class PassError(UdfcError):
    """A compression pass failed; the message names the pass (an internal error, not the user's)."""

    exit_code = 4
