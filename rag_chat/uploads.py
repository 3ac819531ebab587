"""Documents added from the browser: saved under ``RAG_DATA_DIR/uploads/<user>/`` and ingested
by the same pipeline as ``python -m ingest``, one job per upload, with progress per file.

::

    POST /api/documents (files) ──► check each (type, size, name) ──► save ──► Job (queued)
    job runner (one at a time per instance; the ingest lock also serialises with the CLI and
    other instances) ──► Pipeline.run([file], keyword=False) in a worker thread, file by file
    ──► the job's state after each file (Redis, so any instance can answer
    GET /api/documents/jobs/{id}) ──► after the last: one keyword-index rebuild ──► job done

The queue lives in the instance that took the upload: it renews a key per job it holds
(``HEARTBEAT_S``), and a job found queued or running without one (its instance stopped) is
reported failed, not left running forever.

The retriever sees the job's chunks when the job is done: the keyword index is reloaded when
the pipeline swaps in the rebuilt one, and an embedded Chroma is reopened with it (what another
instance or ``python -m ingest`` wrote reaches dense search the same way). One rebuild per job,
not per file: a rebuild reads every chunk in the manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from rag_chat.errors import BadRequest, MemoryUnavailable, NotFound, RagChatError
from rag_chat.retrieval.embedder import Embedder
from rag_chat.rooms.log import driver_options
from rag_chat.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

JOB_TTL_S = 24 * 3600
BUSY_RETRY_S = 1.0
BUSY_WAIT_S = 600.0
# the instance holding a queued or running job renews a key of it this often; a job whose key
# lapsed (its instance crashed or was stopped) is reported failed, not left "running" forever
HEARTBEAT_S = 10.0
ALIVE_TTL_S = 35.0
STOPPED = "not ingested: the server working on this upload stopped; upload the file again"
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


class UnsupportedType(RagChatError):
    code = "unsupported_type"
    status = 415


def safe_name(name: str) -> str:
    """A file name that cannot climb out of its folder or hide: the last path part, odd
    characters replaced, no leading dots, at most 120 characters (the suffix kept)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip(" .")
    if not base:
        raise BadRequest(f"file name {name[:80]!r} has no usable characters")
    stem, dot, suffix = base.rpartition(".")
    if dot and len(base) > 120:
        base = stem[: 119 - len(suffix)] + "." + suffix
    return base[:120]


def owner_dir(owner: str) -> str:
    """A folder name for a user: readable and unique (a short hash of the exact name)."""
    readable = _UNSAFE.sub("_", owner).strip(" .")[:40] or "user"
    return f"{readable}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"


@dataclass
class FileState:
    name: str
    state: str = "queued"  # queued, running, done, failed
    chunks: int | None = None
    error: str | None = None


@dataclass
class Job:
    job_id: str
    owner: str
    files: list[FileState]
    state: str = "queued"  # queued, running, done, failed
    message: str | None = None
    created_at: float = field(default_factory=time.time)
    kind: str = "upload"  # or "remove": its file is taken out of the folder and the index

    @property
    def done(self) -> int:
        return sum(f.state in ("done", "failed") for f in self.files)

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "total": len(self.files),
            "done": self.done,
            "files": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.files],
            "message": self.message,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        raw = json.loads(text)
        raw["files"] = [FileState(**f) for f in raw["files"]]
        return cls(**raw)


def _place(files: list[tuple[Path, Path]]) -> None:
    for saved, target in files:
        saved.replace(target)


class JobStore(Protocol):
    async def put(self, job: Job) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def touch(self, job_ids: list[str], ttl_s: float) -> None:
        """These jobs are held by a live instance for ``ttl_s`` more seconds."""

    async def alive(self, job_id: str) -> bool: ...

    async def aclose(self) -> None: ...


class RedisJobStore:
    def __init__(self, url: str, prefix: str) -> None:
        self._redis: Any = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            **driver_options(),
        )
        self.prefix = f"{prefix}job:"

    async def put(self, job: Job) -> None:
        try:
            await self._redis.set(self.prefix + job.job_id, job.to_json(), ex=JOB_TTL_S)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for upload jobs ({exc})") from exc

    async def get(self, job_id: str) -> Job | None:
        try:
            text = await self._redis.get(self.prefix + job_id)
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for upload jobs ({exc})") from exc
        return Job.from_json(text) if text else None

    async def touch(self, job_ids: list[str], ttl_s: float) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.set(f"{self.prefix}{job_id}:alive", "1", px=int(ttl_s * 1000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for upload jobs ({exc})") from exc

    async def alive(self, job_id: str) -> bool:
        try:
            return bool(await self._redis.exists(f"{self.prefix}{job_id}:alive"))
        except (RedisError, OSError) as exc:
            raise MemoryUnavailable(f"Redis is not reachable for upload jobs ({exc})") from exc

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalJobStore:
    def __init__(self) -> None:
        self._jobs: dict[str, str] = {}

    async def put(self, job: Job) -> None:
        self._jobs[job.job_id] = job.to_json()

    async def get(self, job_id: str) -> Job | None:
        text = self._jobs.get(job_id)
        return Job.from_json(text) if text else None

    async def touch(self, job_ids: list[str], ttl_s: float) -> None:
        return None  # one process: the instance answering is the one holding its jobs

    async def alive(self, job_id: str) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class Uploads:
    def __init__(self, settings: Settings, store: JobStore, embedder: Embedder) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.root = settings.data_dir / "uploads"
        self._queue: asyncio.Queue[tuple[Job, list[Path]]] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._held: set[str] = set()  # queued or running here: their keys are renewed
        self._pipeline: Any = None

    def check(self, name: str, size: int | None) -> str:
        """The name to store it under; a clear error for what cannot be ingested."""
        from ingest.loaders import SUPPORTED

        safe = safe_name(name)
        suffix = Path(safe).suffix.lower()
        if suffix not in SUPPORTED:
            kinds = ", ".join(sorted(SUPPORTED))
            raise UnsupportedType(
                f"{name[:80]!r}: {suffix or 'no extension'} files cannot be ingested; "
                f"supported: {kinds}"
            )
        limit = self.settings.upload_max_bytes
        if size is not None and size > limit:
            from rag_chat.errors import TooLarge

            raise TooLarge(f"{name[:80]!r} is {size:,} bytes; the limit is {limit:,} bytes")
        return safe

    def folder(self, owner: str) -> Path:
        return self.root / owner_dir(owner)

    @property
    def _manifest(self) -> Path:
        return self.settings.collection_dir(self.settings.collection) / "manifest.sqlite3"

    async def submit(self, owner: str, files: list[tuple[str, Path, Path]]) -> Job:
        """Queue saved files (name shown, where it was saved, where it goes) for ingest.

        Each file waits under a hidden name until the job is in Redis: if Redis is down the
        upload is refused and a file of the same name uploaded before is left as it was."""
        job = Job(uuid.uuid4().hex, owner, [FileState(name) for name, _, _ in files])
        await self.store.touch([job.job_id], ALIVE_TTL_S)
        await self.store.put(job)
        try:
            await asyncio.to_thread(_place, [(saved, target) for _, saved, target in files])
        except OSError as exc:
            job.state, job.message = "failed", f"the upload could not be stored: {exc}"
            for f in job.files:
                f.state, f.error = "failed", "not stored; upload the file again"
            with contextlib.suppress(RagChatError):
                await self.store.put(job)
            raise
        self._enqueue(job, [target for _, _, target in files])
        return job

    def _enqueue(self, job: Job, paths: list[Path]) -> None:
        self._held.add(job.job_id)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="upload-heartbeat")
        self._queue.put_nowait((job, paths))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="upload-jobs")

    async def documents(self, owner: str) -> list[dict[str, Any]]:
        """The caller's uploaded files: name, size, when, and how many chunks of each are in
        the index (None: not ingested, or not yet)."""
        return await asyncio.to_thread(self._documents, self.folder(owner))

    def _documents(self, folder: Path) -> list[dict[str, Any]]:
        import sqlite3

        from ingest.manifest import read_only

        if not folder.is_dir():
            return []
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
        counts: dict[str, int] = {}
        with read_only(self._manifest) as db:
            if files and db is not None:
                keys = [str(p.resolve()) for p in files]
                marks = ",".join("?" * len(keys))
                try:
                    counts = dict(
                        db.execute(
                            "SELECT d.path, COUNT(c.id) FROM docs d LEFT JOIN chunks c "
                            f"ON c.doc_key = d.doc_key WHERE d.path IN ({marks}) GROUP BY d.path",
                            keys,
                        ).fetchall()
                    )
                except sqlite3.Error as exc:  # an index being created: nothing to count yet
                    log.warning("upload listing could not read the manifest: %s", exc)
        out = []
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            out.append(
                {
                    "name": path.name,
                    "bytes": st.st_size,
                    "modified": st.st_mtime,
                    "chunks": counts.get(str(path.resolve())),
                }
            )
        return out

    async def remove(self, owner: str, name: str) -> Job:
        """Queue the removal of one of the caller's files: from the folder, then (a job, in
        turn with uploads, under the ingest lock) its chunks from the index."""
        folder = self.folder(owner)
        try:
            usable = safe_name(name) == name  # an upload's name is stored as safe_name gave it
        except BadRequest:
            usable = False
        if not usable or not (folder / name).is_file():
            raise NotFound(f"no uploaded document {name[:120]!r}")
        job = Job(uuid.uuid4().hex, owner, [FileState(name)], kind="remove")
        await self.store.touch([job.job_id], ALIVE_TTL_S)
        await self.store.put(job)
        self._enqueue(job, [folder / name])
        return job

    async def job(self, owner: str, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None or job.owner != owner:
            raise NotFound(f"no upload job {job_id!r}")
        if job.state in ("queued", "running") and not await self.store.alive(job_id):
            # its instance stopped (a crash, a restart): nobody will finish it
            job.state = "failed"
            for f in job.files:
                if f.state in ("queued", "running"):
                    f.state, f.error = "failed", STOPPED
            failed = sum(f.state == "failed" for f in job.files)
            job.message = (
                f"the server ingesting this upload stopped: {len(job.files) - failed} of "
                f"{len(job.files)} files ingested"
            )
            await self.store.put(job)
        return job

    async def _beat(self) -> None:
        """Renew the keys of the jobs held here while there are any."""
        while self._held:
            await asyncio.sleep(HEARTBEAT_S)
            if not self._held:
                break
            try:
                await self.store.touch(sorted(self._held), ALIVE_TTL_S)
            except MemoryUnavailable as exc:  # the next beat may get through
                log.warning("upload jobs' heartbeat failed: %s", exc)

    def start(self) -> None:
        """At start-up, before any new job: finish what a job cut off by a crash or restart
        left undone — a removal's file deleted but its chunks still indexed (pruned now), an
        upload's files stored but the keyword index, rebuilt at a job's end, lacking them
        (rebuilt if the manifest marks it stale)."""
        self._runner = asyncio.create_task(self._run(recover=True), name="upload-jobs")

    async def _recover(self) -> None:
        from ingest.pipeline import Pipeline

        # a removal cut off between deleting its file and pruning the index
        for folder in await asyncio.to_thread(self._folders_with_removed_files):
            pipeline = await asyncio.to_thread(self._make_pipeline)
            report = await self._locked(pipeline.run, [folder], prune=True, keyword=False)
            log.info(
                "uploads removed before a restart: %d chunks out of the index",
                report.chunks_deleted,
            )
        if not await asyncio.to_thread(Pipeline.keyword_index_marked_stale, self.settings):
            return
        pipeline = await asyncio.to_thread(self._make_pipeline)
        seconds = await self._locked(pipeline.refresh_keyword_index)
        if seconds is not None:
            log.info(
                "keyword index left stale by an earlier upload job: rebuilt in %.2f s", seconds
            )

    def _folders_with_removed_files(self) -> list[Path]:
        """Upload folders holding a file the manifest lists but the disk no longer has."""
        from ingest.manifest import read_only

        if not self.root.is_dir():
            return []
        root = self.root.resolve()
        # the paths under root/ — a range both tables' path indexes answer ("0" follows "/")
        low, high = f"{root}/", f"{root}0"
        with read_only(self._manifest) as db:
            if db is None:
                return []
            rows = db.execute(
                "SELECT path FROM files WHERE path >= ?1 AND path < ?2 "
                "UNION SELECT path FROM docs WHERE path >= ?1 AND path < ?2",
                (low, high),
            ).fetchall()
        paths = [p for (path,) in rows if (p := Path(path)).is_relative_to(root)]
        return sorted({p.parent for p in paths if not p.exists() and p.parent.is_dir()})

    async def _locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, waiting while the CLI or another instance holds the
        ingest lock (``IngestBusy``), up to ``BUSY_WAIT_S``."""
        from ingest.pipeline import IngestBusy

        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except IngestBusy:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(BUSY_RETRY_S)

    async def _run(self, recover: bool = False) -> None:
        if recover:
            try:
                await self._recover()
            except Exception:  # the jobs must run all the same
                log.exception("start-up keyword index check failed")
        while not self._queue.empty():
            job, paths = self._queue.get_nowait()
            try:
                if job.kind == "remove":
                    await self._remove(job, paths[0])
                else:
                    await self._ingest(job, paths)
            except Exception as exc:  # a job must never kill the runner
                log.exception("upload job %s failed", job.job_id)
                what = "removal" if job.kind == "remove" else "ingest"
                job.state, job.message = "failed", f"{what} failed: {exc}"
                with contextlib.suppress(RagChatError):
                    await self.store.put(job)
            finally:
                self._held.discard(job.job_id)

    def _make_pipeline(self) -> Any:
        from ingest.pipeline import Pipeline

        if self._pipeline is None:
            self._pipeline = Pipeline(
                self.settings,
                embedder=self.embedder,
                progress=False,
                log=lambda line: log.info("upload ingest: %s", line),
                display_root=self.settings.data_dir,
            )
        return self._pipeline

    async def _ingest(self, job: Job, paths: list[Path]) -> None:
        job.state = "running"
        await self.store.put(job)
        pipeline = await asyncio.to_thread(self._make_pipeline)

        async def refresh() -> None:
            # searches see the job's chunks from here: the rebuilt index is swapped in and an
            # embedded Chroma reopened with it
            seconds = await self._locked(pipeline.refresh_keyword_index)
            if seconds is not None:
                log.info("upload job %s: keyword index rebuilt in %.2f s", job.job_id, seconds)

        try:
            for state, path in zip(job.files, paths, strict=True):
                state.state = "running"
                await self.store.put(job)
                # the keyword index is rebuilt once, after the last file (a rebuild reads
                # every chunk: ~2 s at 100,000 of them), not once per file
                report = await self._locked(pipeline.run, [path], prune=False, keyword=False)
                if report.errors:
                    msg = "; ".join(m for _, m in report.errors)
                    state.state, state.error = "failed", msg[:500]
                else:
                    state.state = "done"
                    state.chunks = report.chunks_added + report.chunks_kept
                await self.store.put(job)
        except asyncio.CancelledError:
            raise  # shutting down: the manifest marks the index stale; the next start rebuilds
        except Exception:
            await refresh()  # the files done before the failure
            raise
        await refresh()
        failed = sum(f.state == "failed" for f in job.files)
        job.state = "failed" if failed == len(job.files) else "done"
        job.message = (
            f"{len(job.files) - failed} of {len(job.files)} files ingested"
            if failed
            else f"{len(job.files)} file{'s' * (len(job.files) != 1)} ingested"
        )
        await self.store.put(job)

    async def _remove(self, job: Job, path: Path) -> None:
        """Delete the file, then prune the folder's files that are gone from the index (under
        the ingest lock: another ingest may be writing), then rebuild the keyword index."""
        state = job.files[0]
        job.state = state.state = "running"
        await self.store.put(job)
        pipeline = await asyncio.to_thread(self._make_pipeline)

        def remove() -> Any:
            path.unlink(missing_ok=True)
            return pipeline.run([path.parent], prune=True, keyword=False)

        report = await self._locked(remove)
        for shown, msg in report.errors:  # other files of the folder: not this job's doing
            log.info("upload removal %s: %s: %s", job.job_id, shown, msg)
        seconds = await self._locked(pipeline.refresh_keyword_index)
        if seconds is not None:
            log.info("upload removal %s: keyword index rebuilt in %.2f s", job.job_id, seconds)
        state.state, state.chunks = "done", report.chunks_deleted
        job.state = "done"
        n = report.chunks_deleted
        job.message = f"{state.name} removed ({n} chunk{'s' * (n != 1)})"
        await self.store.put(job)

    async def aclose(self) -> None:
        for task in (self._runner, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self.store.aclose()
