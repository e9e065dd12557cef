"""The command line's exit codes and its one-line errors."""
from __future__ import annotations

# Exit codes: argparse already uses 2 for bad usage; bad input (TARGET, options) shares it.
EXIT_OK = 0
EXIT_ERROR = 1        # an unexpected failure inside attnpass (a bug: please report it with --debug)
EXIT_USAGE = 2        # bad command line or input: TARGET, options, method names, lengths
EXIT_CAPTURE = 3      # the model could not be captured, or holds no attention the command can use
EXIT_UNAVAILABLE = 4  # the feature is not available in this version (ONNX export)


class CliError(Exception):
    """An error the command line reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
