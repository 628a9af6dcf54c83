"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class UptrainError(Exception):
    """Bad input or a failed precondition. The message names the problem and the fix."""
