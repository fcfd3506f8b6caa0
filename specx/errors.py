"""Exceptions for problems a user can fix. The CLI prints their message on one line, without a traceback."""


class SpecxError(Exception):
    """Base class: the message says what went wrong and what to do."""


class BundleError(SpecxError):
    """A bundle directory is missing, corrupt, of another format version, or inconsistent."""


class ContractError(BundleError):
    """A graph does not match the I/O contract the runtime expects."""


class ProviderError(SpecxError):
    """The requested execution provider cannot be used on this machine."""


class InvalidArgumentError(SpecxError, ValueError):
    """A user-supplied value (prompt, sampling parameter, length) is not acceptable."""


class UnsupportedModelError(SpecxError):
    """The model's architecture has no adapter."""


class SourceError(SpecxError):
    """A model source (hub id, directory, .gguf file) cannot be loaded."""


class ExportError(SpecxError):
    """Export or its validation failed."""


class CapacityError(InvalidArgumentError):
    """A generation would not fit the KV cache (the model's context or the user's --max-context)."""


class StreamInterruptedError(SpecxError):
    """A stream of a Generator was left open while another generation started on it in the same thread: the newer
    generation took the model over, and the older stream ends with this error when read again."""
