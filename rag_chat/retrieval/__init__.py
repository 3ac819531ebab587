"""Embedder, Chroma vector store, BM25 keyword index and the retriever that fuses them."""
