"""The one error hierarchy. Transports alone map these to HTTP codes, WS ``error`` events or
close codes; ``code`` is the stable string clients see, ``str(exc)`` the one-line message.

    RagChatError
     ├── BadRequest            bad_request          (400)
     ├── NotFound              not_found            (404)
     ├── NotJoined             not_joined           (403)
     ├── Unauthorized          unauthorized         (401)
     ├── Forbidden             forbidden            (403)
     ├── TooLarge              too_large            (413)
     ├── RateLimited           rate_limited         (429, with retry_after)
     │    ├── TooManyReplies   too_many_replies     (429)
     │    └── TooManyConnections too_many_connections (429)
     ├── LLMError              llm_error            (502)
     │    ├── LLMUnavailable   llm_unavailable      (503)
     │    └── LLMTimeout       llm_timeout          (504)
     ├── RetrievalError        retrieval_error      (500)
     ├── MemoryUnavailable     memory_unavailable   (503)
     └── StorageError          storage_error        (500)
          └── StorageFull      insufficient_storage (507)
"""

from __future__ import annotations


class RagChatError(Exception):
    code = "internal_error"
    status = 500


class BadRequest(RagChatError):
    code = "bad_request"
    status = 400


class NotFound(RagChatError):
    code = "not_found"
    status = 404


class Conflict(RagChatError):
    """The request is well formed but the state it needs is not there (any longer): e.g. a
    regenerate of an answer that is no longer the latest."""

    code = "conflict"
    status = 409


class NotJoined(RagChatError):
    code = "not_joined"
    status = 403


class Unauthorized(RagChatError):
    code = "unauthorized"
    status = 401


class Forbidden(RagChatError):
    code = "forbidden"
    status = 403


class TooLarge(RagChatError):
    code = "too_large"
    status = 413


class RateLimited(RagChatError):
    """A limit was hit; ``retry_after`` (seconds) says when trying again can work."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)

    @property
    def retry_after_s(self) -> int:
        """Whole seconds, rounded up, for a ``Retry-After`` header."""
        return max(1, int(-(-self.retry_after // 1)))


class TooManyReplies(RateLimited):
    code = "too_many_replies"


class TooManyConnections(RateLimited):
    code = "too_many_connections"


class LLMError(RagChatError):
    code = "llm_error"
    status = 502


class LLMUnavailable(LLMError):
    code = "llm_unavailable"
    status = 503


class LLMTimeout(LLMError):
    code = "llm_timeout"
    status = 504


class RetrievalError(RagChatError):
    code = "retrieval_error"
    status = 500


class MemoryUnavailable(RagChatError):
    code = "memory_unavailable"
    status = 503


class StorageError(RagChatError):
    """A file could not be written (permissions, I/O)."""

    code = "storage_error"
    status = 500


class StorageFull(StorageError):
    """No room left for a file: the disk or a quota is full, or the file is over a size limit
    the system sets."""

    code = "insufficient_storage"
    status = 507
