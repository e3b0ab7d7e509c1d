"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MoepruneError(Exception):
    """A problem with the user's input: the message says what is wrong and what to change."""
