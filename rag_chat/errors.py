"""The one error hierarchy. Transports alone map these to HTTP codes, WS ``error`` events or
close codes; ``code`` is the stable string clients see, ``str(exc)`` the one-line message.

    RagChatError
     ├── BadRequest            bad_request          (400)
     ├── NotFound              not_found            (404)
 ├── NotJoined             not_joined           (403)
     ├── LLMError              llm_error            (502)
     │    ├── LLMUnavailable   llm_unavailable      (503)
     │    └── LLMTimeout       llm_timeout          (504)
     ├── RetrievalError        retrieval_error      (500)
     └── MemoryUnavailable     memory_unavailable   (503)
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


class NotJoined(RagChatError):
    code = "not_joined"
    status = 403


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
