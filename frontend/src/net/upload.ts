/**
 * Document upload: multipart POST /api/documents with progress (XMLHttpRequest: fetch has no
 * upload progress), then polling the ingest job until it is done or failed.
 */
import type { IngestJob, UploadAccepted } from "../protocol";
import { ApiError } from "./api";

export interface XhrLike {
  open(method: string, url: string): void;
  send(body: FormData): void;
  abort(): void;
  setRequestHeader(name: string, value: string): void;
  withCredentials: boolean;
  status: number;
  responseText: string;
  upload: { onprogress: ((ev: { loaded: number; total: number; lengthComputable: boolean }) => void) | null };
  onload: (() => void) | null;
  onerror: (() => void) | null;
  onabort: (() => void) | null;
}

export interface UploadHandle {
  promise: Promise<UploadAccepted>;
  abort(): void;
}

const STATUS_CODES: Record<number, string> = { 400: "bad_request", 401: "unauthorized", 403: "forbidden", 413: "too_large", 415: "unsupported_type", 429: "rate_limited" };

/** The ApiError for a failed upload response. */
export function uploadError(status: number, body: string): ApiError {
  let code = STATUS_CODES[status] ?? (status === 0 ? "network" : "http_error");
  let message = status === 0 ? "network error" : `upload failed (${status})`;
  try {
    const err = (JSON.parse(body) as { error?: { code?: unknown; message?: unknown } }).error;
    if (err && typeof err.code === "string") code = err.code;
    if (err && typeof err.message === "string") message = err.message;
  } catch {
    /* not JSON */
  }
  return new ApiError(status, code, message);
}

/** A short message for the user. */
export function describeUploadError(e: unknown): string {
  if (!(e instanceof ApiError)) return e instanceof Error ? e.message : String(e);
  switch (e.code) {
    case "too_large":
      return `Too large: ${e.message}`;
    case "unsupported_type":
      return `Unsupported file type: ${e.message}`;
    case "unauthorized":
      return "Sign in to add documents";
    case "forbidden":
      return `Not allowed: ${e.message}`;
    case "network":
      return "Upload failed: the server could not be reached";
    case "not_found":
    case "method_not_allowed":
      return "This server does not accept uploads";
    default:
      return e.message;
  }
}

export function uploadFiles(
  files: readonly File[],
  onProgress: (loaded: number, total: number) => void,
  createXhr: () => XhrLike = () => new XMLHttpRequest() as unknown as XhrLike,
  url = "/api/documents",
): UploadHandle {
  const xhr = createXhr();
  const promise = new Promise<UploadAccepted>((resolve, reject) => {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    xhr.open("POST", url);
    xhr.withCredentials = true;
    xhr.setRequestHeader("accept", "application/json");
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) onProgress(ev.loaded, ev.total);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText) as UploadAccepted);
        } catch {
          reject(new ApiError(xhr.status, "bad_response", "the server's answer was not JSON"));
        }
      } else reject(uploadError(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => reject(uploadError(0, ""));
    xhr.onabort = () => reject(new ApiError(0, "aborted", "upload cancelled"));
    xhr.send(form);
  });
  return { promise, abort: () => xhr.abort() };
}

export interface PollOptions {
  fetchJob: (jobId: string) => Promise<IngestJob>;
  onUpdate: (job: IngestJob) => void;
  intervalMs?: number;
  sleep?: (ms: number) => Promise<void>;
  signal?: { aborted: boolean };
  /** Transient fetch errors tolerated in a row before giving up. */
  maxErrors?: number;
}

const defaultSleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Poll a job every intervalMs (500) until it is done or failed; the last state is returned. */
export async function pollJob(jobId: string, opts: PollOptions): Promise<IngestJob> {
  const sleep = opts.sleep ?? defaultSleep;
  const every = opts.intervalMs ?? 500;
  const maxErrors = opts.maxErrors ?? 5;
  let errors = 0;
  for (;;) {
    if (opts.signal?.aborted) throw new ApiError(0, "aborted", "stopped watching the job");
    try {
      const job = await opts.fetchJob(jobId);
      errors = 0;
      opts.onUpdate(job);
      if (job.state === "done" || job.state === "failed") return job;
    } catch (e) {
      // a 404 will not get better; a blip might
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e;
      if (++errors >= maxErrors) throw e;
    }
    await sleep(every);
  }
}

/** Progress of a job, 0..1. */
export function jobProgress(job: IngestJob): number {
  if (job.state === "done") return 1;
  if (!job.total) return 0;
  return Math.min(1, Math.max(0, job.done / job.total));
}
