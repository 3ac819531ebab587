"""Test and benchmark helpers that ship with the package (nothing here is used by the server).

``python -m rag_chat.testing.token_server`` is a synthetic OpenAI-compatible chat server whose
answers are known in advance: see :mod:`rag_chat.testing.token_server`. (Not imported here, so
that ``python -m`` runs the module once, without runpy's double-import warning.)
"""
