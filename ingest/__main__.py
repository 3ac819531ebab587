"""``python -m ingest PATH…``: parse, chunk, embed and sync files into the index.

Exit status: 0 all landed; 1 some file or path failed (the rest landed); 2 bad usage or
settings; 74 the index could not be written (a full disk, an unwritable RAG_DATA_DIR: the
index stays consistent); 75 another ingest holds the lock; 130 interrupted (consistent too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

EXIT_FAILED, EXIT_USAGE, EXIT_STORAGE, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 74, 75, 130


def storage_failure(exc: BaseException) -> bool:
    """The index's own storage failed: a file system error (a full disk or quota, a file-size
    limit, RAG_DATA_DIR unwritable or not a folder), SQLite's (the manifest) or Chroma's.
    A file that cannot be read is not one of these: the pipeline reports it per file."""
    import sqlite3

    return isinstance(exc, (OSError, sqlite3.Error)) or type(exc).__module__.startswith("chromadb")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Load files into rag_chat's index: parse, chunk, embed, sync incrementally.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to ingest")
    p.add_argument("--collection", help="collection to write (default: RAG_COLLECTION or 'docs')")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be added, updated and deleted; change nothing",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="drop the collection and its manifest first, then ingest from scratch",
    )
    prune = p.add_mutually_exclusive_group()
    prune.add_argument(
        "--prune",
        dest="prune",
        action="store_true",
        default=True,
        help="remove documents whose files vanished from a folder given here (the default)",
    )
    prune.add_argument(
        "--no-prune", dest="prune", action="store_false", help="keep documents whose files vanished"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="texts per embedding batch (default: RAG_EMBEDDING_BATCH_SIZE or 64)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar, errors and summary only"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ingest.pipeline import IngestBusy, IngestError, Pipeline
    from rag_chat.settings import Settings

    def err(msg: str) -> None:
        print(f"ingest: {msg}", file=sys.stderr, flush=True)

    if args.batch_size is not None and args.batch_size < 1:
        err("--batch-size must be a positive number")
        return EXIT_USAGE
    try:
        settings = Settings(**({"collection": args.collection} if args.collection else {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        err(f"bad setting {where}: {first['msg']}")
        return EXIT_USAGE
    try:
        pipeline = Pipeline(
            settings, batch_size=args.batch_size, progress=False if args.quiet else None
        )
        report = pipeline.run(args.paths, dry_run=args.dry_run, prune=args.prune, reset=args.reset)
    except IngestBusy as exc:
        err(str(exc))
        return EXIT_BUSY
    except IngestError as exc:
        err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        err("interrupted; the index is consistent, run the same command again to finish")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not storage_failure(exc):
            raise
        err(
            f"could not write the index in {settings.data_dir}: {one_line(exc)} — the index "
            "is consistent: make room (or fix the folder) and run the same command again"
        )
        return EXIT_STORAGE

    for path, message in report.errors:
        err(f"{path}: {message}")
    if args.dry_run:
        for action, what in report.planned:
            print(f"would {action:6} {what}")
        print(
            f"dry run: {report.files_added} to add, {report.files_updated} to update, "
            f"{report.files_deleted} to delete, {report.files_unchanged} unchanged, "
            f"{report.files_failed} failing; about {report.chunks_added} chunks to embed"
        )
    else:
        rate = report.chunks_added / report.seconds if report.seconds else 0.0
        print(
            f"files: {report.files_added} added, {report.files_updated} updated, "
            f"{report.files_unchanged} unchanged, {report.files_deleted} deleted, "
            f"{report.files_failed} failed, {report.files_ignored} ignored (unsupported type)\n"
            f"chunks: {report.chunks_added} embedded, {report.chunks_kept} kept, "
            f"{report.chunks_deleted} deleted"
            + (
                f"; {report.reconciled} orphaned vectors removed after an interrupted run"
                if report.reconciled
                else ""
            )
            + f"\ntime: {report.seconds:.2f}s, {rate:.1f} chunks/s "
            f"(collection {pipeline.collection!r} in {settings.data_dir})"
        )
    if report.interrupted:
        err("interrupted; the index is consistent, run the same command again to finish")
        return EXIT_INTERRUPTED
    return 0 if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
