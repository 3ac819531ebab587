/**
 * The HTTP API (same origin, session cookie). `fetch` is injectable for tests.
 */
import type {
  AuthInfo,
  ConversationList,
  ConversationMessages,
  DocumentList,
  IngestJob,
  SessionInfo,
  UploadAccepted,
} from "../protocol";

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

const FALLBACK_CODES: Record<number, string> = {
  400: "bad_request",
  401: "unauthorized",
  403: "forbidden",
  404: "not_found",
  413: "too_large",
  415: "unsupported_type",
  429: "rate_limited",
  503: "unavailable",
};

/** The `{"error": {"code", "message"}}` body of a failed response, or a fallback. */
export async function errorFrom(res: Response): Promise<ApiError> {
  let code = FALLBACK_CODES[res.status] ?? "http_error";
  let message = `${res.status} ${res.statusText || "error"}`.trim();
  try {
    const body: unknown = await res.json();
    const err = (body as { error?: { code?: unknown; message?: unknown } } | null)?.error;
    if (err && typeof err === "object") {
      if (typeof err.code === "string") code = err.code;
      if (typeof err.message === "string") message = err.message;
    } else {
      const detail = (body as { detail?: unknown } | null)?.detail;
      if (typeof detail === "string") message = detail;
    }
  } catch {
    /* not JSON */
  }
  return new ApiError(res.status, code, message);
}

export function createApi(fetchImpl: FetchLike = (i, init) => fetch(i, init), base = "") {
  async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const init: RequestInit = { method, credentials: "same-origin", headers: { accept: "application/json" } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { ...init.headers, "content-type": "application/json" };
    }
    let res: Response;
    try {
      res = await fetchImpl(base + path, init);
    } catch (e) {
      throw new ApiError(0, "network", e instanceof Error ? e.message : "network error");
    }
    if (!res.ok) throw await errorFrom(res);
    if (res.status === 204) return undefined as T;
    return (await res.json()) as T;
  }

  return {
    /** The auth mode; an older server without /api/auth is open. */
    async auth(): Promise<AuthInfo> {
      try {
        return await call<AuthInfo>("GET", "/api/auth");
      } catch (e) {
        if (e instanceof ApiError && (e.status === 404 || e.status === 405)) return { mode: "open", user: null };
        throw e;
      }
    },
    signIn: (token: string) => call<SessionInfo>("POST", "/api/auth/session", { token }),
    signOut: () => call<void>("DELETE", "/api/auth/session"),
    conversations: (page: { before?: number; limit?: number } = {}) => {
      const q = new URLSearchParams();
      if (page.limit !== undefined) q.set("limit", String(page.limit));
      if (page.before !== undefined) q.set("before", String(page.before));
      const qs = q.toString();
      return call<ConversationList>("GET", `/api/conversations${qs ? `?${qs}` : ""}`);
    },
    messages: (id: string) => call<ConversationMessages>("GET", `/api/conversations/${encodeURIComponent(id)}/messages`),
    deleteConversation: (id: string) => call<void>("DELETE", `/api/conversations/${encodeURIComponent(id)}/messages`),
    renameConversation: (id: string, title: string) => call<{ id: string; title: string }>("PATCH", `/api/conversations/${encodeURIComponent(id)}`, { title }),
    job: (jobId: string) => call<IngestJob>("GET", `/api/documents/jobs/${encodeURIComponent(jobId)}`),
    /** The caller's uploads, with their chunks in the index. */
    documents: () => call<DocumentList>("GET", "/api/documents"),
    /** Queue the removal of one upload from the folder and the index: poll the job. */
    removeDocument: (name: string) => call<UploadAccepted>("DELETE", `/api/documents/${encodeURIComponent(name)}`),
  };
}

export type Api = ReturnType<typeof createApi>;
