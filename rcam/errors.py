"""The one error type rcam raises for problems a user can fix (bad input, bad bitstream, bad usage)."""


class RcamError(Exception):
    """A problem with the user's input or request; the CLI prints its message and exits with status 2."""
