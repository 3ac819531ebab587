"""rag_chat: a self-hosted, real-time chat server that answers questions over your documents."""

__version__ = "0.1.0"
