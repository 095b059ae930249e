"""The one exception type whose message is meant for the user, and how to tell a failed allocation."""


class KANTumorSegError(Exception):
    """A failure the user can fix (a missing file, a bad option, a corrupt input).

    The command prints its message as one sentence and exits non-zero without a
    traceback; any other exception is a bug and keeps its traceback under ``--debug``.
    """


OUT_OF_MEMORY_PHRASES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate",
                         # oneDNN, when it cannot allocate a convolution's scratch memory:
                         "could not create a primitive",
                         # the loader, when a memory limit leaves no room to map a library:
                         "failed to map segment")


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError (numpy, Python), or a failed allocation reported as another error (torch, SimpleITK, imports)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, ImportError, OSError)) and any(phrase in text for phrase in OUT_OF_MEMORY_PHRASES)
