"""Ingestion: loaders, chunking, manifest and the incremental pipeline (``python -m ingest``)."""
