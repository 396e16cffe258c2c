"""The one exception type users see: a problem with their input, worded as a one-line message.

Every bad input (config, data file, CLI argument) raises `MsaError`; the CLI prints its message on
one line and exits non-zero. Anything else that escapes is a bug in msa, not in the input.
"""


class MsaError(Exception):
    """A user-facing error whose message names the problem and, where possible, the fix."""

    exit_code = 2
