"""The one exception type whose message is meant for the user."""


class KANTumorSegError(Exception):
    """A failure the user can fix (a missing file, a bad option, a corrupt input).

    The command prints its message as one sentence and exits non-zero without a
    traceback; any other exception is a bug and keeps its traceback under ``--debug``.
    """
