"""``POST /api/documents``: add documents from the browser; ``GET /api/documents/jobs/{id}``:
how their ingest is going. See rag_chat.uploads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi import Path as PathParam
from pydantic import BaseModel

from rag_chat.api.deps import Caller, services_of
from rag_chat.errors import BadRequest, StorageError, StorageFull, TooLarge

router = APIRouter(prefix="/api/documents", tags=["documents"])
CHUNK = 1 << 20
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the disk, a quota, a file size limit


class FileOut(BaseModel):
    name: str
    state: str
    chunks: int | None = None
    error: str | None = None


class JobOut(BaseModel):
    job_id: str
    kind: str = "upload"
    state: str
    total: int
    done: int
    files: list[FileOut]
    message: str | None = None


class UploadOut(BaseModel):
    job_id: str
    files: list[str]


class DocumentOut(BaseModel):
    name: str
    bytes: int
    modified: float  # seconds since the epoch
    chunks: int | None = None  # in the index; None: not ingested (yet)


class DocumentsOut(BaseModel):
    documents: list[DocumentOut]


def _save(upload: UploadFile, tmp: Path, limit: int) -> None:
    """Copy in blocks, stopping at the limit (the declared size can lie), to a hidden name
    that ``Uploads.submit`` renames once the job is registered."""
    written = 0
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            upload.file.seek(0)
            while block := upload.file.read(CHUNK):
                written += len(block)
                if written > limit:
                    out.close()
                    tmp.unlink(missing_ok=True)
                    raise TooLarge(f"{upload.filename!r} is over the limit of {limit:,} bytes")
                out.write(block)
    except OSError as exc:  # the disk is full, the folder unwritable: say so, keep nothing
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        what = exc.strerror or type(exc).__name__
        if exc.errno in NO_ROOM:
            raise StorageFull(f"no room to store {upload.filename!r}: {what}") from exc
        raise StorageError(f"could not store {upload.filename!r}: {what}") from exc


@router.post("", status_code=202, response_model=UploadOut)
async def upload_documents(
    request: Request,
    who: Caller,
    files: Annotated[list[UploadFile], File(description="one or more documents")],
) -> UploadOut:
    """Store the files and ingest them in the background; poll the job for progress."""
    services = services_of(request)
    uploads = services.uploads
    settings = services.settings
    if not files:
        raise BadRequest("no files: send them as multipart/form-data fields named 'files'")
    if len(files) > settings.upload_max_files:
        raise BadRequest(f"{len(files)} files; at most {settings.upload_max_files} per upload")
    names: list[str] = []
    for f in files:  # every file is checked before any is kept: all or nothing
        name = uploads.check(f.filename or "", f.size)
        if name in names:
            raise BadRequest(f"{name!r} is twice in this upload")
        names.append(name)
    folder = uploads.folder(who.owner)
    # nothing is kept unless everything is: every file saved, and the job registered in Redis
    saved: list[tuple[str, Path, Path]] = []
    try:
        for f, name in zip(files, names, strict=True):
            tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}.part"
            saved.append((name, tmp, folder / name))
            await asyncio.to_thread(_save, f, tmp, settings.upload_max_bytes)
        job = await uploads.submit(who.owner, saved)
    except BaseException:
        for _, tmp, _ in saved:
            await asyncio.to_thread(tmp.unlink, True)
        raise
    return UploadOut(job_id=job.job_id, files=names)


@router.get("", response_model=DocumentsOut)
async def list_documents(request: Request, who: Caller) -> dict[str, Any]:
    """The caller's uploaded documents, with how many chunks of each are in the index."""
    return {"documents": await services_of(request).uploads.documents(who.owner)}


@router.delete("/{name}", status_code=202, response_model=UploadOut)
async def remove_document(
    request: Request,
    who: Caller,
    name: Annotated[str, PathParam(min_length=1, max_length=255)],
) -> UploadOut:
    """Take one of the caller's uploads out of the folder and the index; poll the job."""
    job = await services_of(request).uploads.remove(who.owner, name)
    return UploadOut(job_id=job.job_id, files=[name])


@router.get("/jobs/{job_id}", response_model=JobOut)
async def upload_job(
    request: Request,
    who: Caller,
    job_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")],
) -> dict[str, Any]:
    """Progress of an upload: the job's state and each file's (chunks, or the error)."""
    job = await services_of(request).uploads.job(who.owner, job_id)
    return job.view()
