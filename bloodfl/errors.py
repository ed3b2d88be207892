"""User-facing errors: one line that names the problem and the fix, printed without a traceback."""


class BloodflError(Exception):
    """A problem with the user's input or environment (config, data, weights), not a bug in bloodfl."""
