import { describe, expect, it } from "vitest";
import { ApiError, createApi } from "../src/net/api";
import { describeUploadError, jobProgress, pollJob, uploadFiles, type XhrLike } from "../src/net/upload";
import type { IngestJob } from "../src/protocol";
import { parseServerEvent, stampOf } from "../src/protocol";

function fakeFetch(routes: Record<string, (init?: RequestInit) => Response>) {
  const calls: { url: string; init?: RequestInit }[] = [];
  const f = async (url: string, init?: RequestInit) => {
    calls.push({ url, init });
    const key = `${init?.method ?? "GET"} ${url}`;
    const h = routes[key];
    if (!h) return new Response(JSON.stringify({ error: { code: "not_found", message: "no route" } }), { status: 404 });
    return h(init);
  };
  return { f, calls };
}
const json = (body: unknown, status = 200) => new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

describe("api", () => {
  it("reads the auth mode; a server without /api/auth is open", async () => {
    const { f, calls } = fakeFetch({ "GET /api/auth": () => json({ mode: "jwt", user: null }) });
    expect(await createApi(f).auth()).toEqual({ mode: "jwt", user: null });
    expect(calls[0]!.init?.credentials).toBe("same-origin");
    expect(await createApi(fakeFetch({}).f).auth()).toEqual({ mode: "open", user: null });
  });

  it("signs in with a token; a bad token is a 401 ApiError", async () => {
    const { f, calls } = fakeFetch({
      "POST /api/auth/session": (init) => {
        const body = JSON.parse(String(init?.body)) as { token: string };
        return body.token === "good" ? json({ user: "alice", expires_at: 1 }) : json({ error: { code: "unauthorized", message: "invalid token", type: "auth" } }, 401);
      },
      "DELETE /api/auth/session": () => new Response(null, { status: 204 }),
    });
    const api = createApi(f);
    expect((await api.signIn("good")).user).toBe("alice");
    expect(calls[0]!.init?.headers).toMatchObject({ "content-type": "application/json" });
    await expect(api.signIn("bad")).rejects.toMatchObject({ status: 401, code: "unauthorized", message: "invalid token" });
    expect(await api.signOut()).toBeUndefined();
  });

  it("lists and deletes conversations; errors without a JSON body get a code from the status", async () => {
    const { f, calls } = fakeFetch({
      "GET /api/conversations": () => json({ conversations: [{ id: "c1", title: "t", updated_at: 1 }] }),
      "DELETE /api/conversations/c%2F1/messages": () => new Response("oops", { status: 503, statusText: "Service Unavailable" }),
    });
    const api = createApi(f);
    expect((await api.conversations()).conversations[0]!.id).toBe("c1");
    const err = await api.deleteConversation("c/1").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiError);
    expect(err).toMatchObject({ status: 503, code: "unavailable" });
    expect(calls[1]!.url).toBe("/api/conversations/c%2F1/messages");
  });

  it("pages through conversations with before/limit", async () => {
    const { f, calls } = fakeFetch({
      "GET /api/conversations": () => json({ conversations: [{ id: "c2", title: "b", updated_at: 2 }], next_before: 2 }),
      "GET /api/conversations?before=2": () => json({ conversations: [{ id: "c1", title: "a", updated_at: 1.5 }], next_before: null }),
      "GET /api/conversations?limit=1&before=1.5": () => json({ conversations: [] }),
    });
    const api = createApi(f);
    expect((await api.conversations()).next_before).toBe(2);
    expect((await api.conversations({ before: 2 })).conversations.map((c) => c.id)).toEqual(["c1"]);
    expect((await api.conversations({ before: 1.5, limit: 1 })).next_before).toBeUndefined();
    expect(calls.map((c) => c.url)).toEqual(["/api/conversations", "/api/conversations?before=2", "/api/conversations?limit=1&before=1.5"]);
  });

  it("renames a conversation with a JSON PATCH; a refusal is an ApiError with the server's message", async () => {
    const { f, calls } = fakeFetch({
      "PATCH /api/conversations/c%2F1": (init) => {
        const { title } = JSON.parse(String(init?.body)) as { title: string };
        return title.trim() ? json({ id: "c/1", title: title.trim() }) : json({ error: { code: "bad_request", message: "the title is empty", type: "invalid_request_error" } }, 400);
      },
    });
    const api = createApi(f);
    expect(await api.renameConversation("c/1", " Ports ")).toEqual({ id: "c/1", title: "Ports" });
    expect(calls[0]!.init?.headers).toMatchObject({ "content-type": "application/json" });
    await expect(api.renameConversation("c/1", " ")).rejects.toMatchObject({ status: 400, code: "bad_request", message: "the title is empty" });
  });

  it("lists the caller's documents and removes one by its name, encoded", async () => {
    const listed = { documents: [{ name: "relay notes.md", bytes: 80, modified: 1, chunks: 2 }, { name: "bad.pdf", bytes: 9, modified: 2, chunks: null }] };
    const { f, calls } = fakeFetch({
      "GET /api/documents": () => json(listed),
      "DELETE /api/documents/relay%20notes.md": () => json({ job_id: "r1", files: ["relay notes.md"] }, 202),
      "GET /api/documents/jobs/r1": () => json({ job_id: "r1", kind: "remove", state: "done", total: 1, done: 1, files: [{ name: "relay notes.md", state: "done", chunks: 2 }], message: "relay notes.md removed (2 chunks)" }),
    });
    const api = createApi(f);
    expect(await api.documents()).toEqual(listed);
    expect(await api.removeDocument("relay notes.md")).toEqual({ job_id: "r1", files: ["relay notes.md"] });
    expect(calls[1]!.init?.method).toBe("DELETE");
    expect((await api.job("r1")).kind).toBe("remove");
    await expect(api.removeDocument("gone.md")).rejects.toMatchObject({ status: 404, code: "not_found" });
  });

  it("a network failure is an ApiError with status 0", async () => {
    const api = createApi(async () => {
      throw new TypeError("Failed to fetch");
    });
    await expect(api.conversations()).rejects.toMatchObject({ status: 0, code: "network" });
  });
});

class FakeXhr implements XhrLike {
  withCredentials = false;
  status = 0;
  responseText = "";
  upload: XhrLike["upload"] = { onprogress: null };
  onload: (() => void) | null = null;
  onerror: (() => void) | null = null;
  onabort: (() => void) | null = null;
  opened: [string, string] | null = null;
  body: FormData | null = null;
  open(method: string, url: string) {
    this.opened = [method, url];
  }
  send(body: FormData) {
    this.body = body;
  }
  abort() {
    this.onabort?.();
  }
  setRequestHeader() {}
  respond(status: number, body: unknown) {
    this.status = status;
    this.responseText = JSON.stringify(body);
    this.onload?.();
  }
}

describe("upload", () => {
  const files = [new File(["# hi"], "a.md", { type: "text/markdown" }), new File(["x"], "b.txt")];

  it("posts every file as `files` with progress, resolves the job", async () => {
    const xhr = new FakeXhr();
    const progress: number[] = [];
    const h = uploadFiles(files, (l, t) => progress.push(l / t), () => xhr);
    expect(xhr.opened).toEqual(["POST", "/api/documents"]);
    expect(xhr.withCredentials).toBe(true);
    expect(xhr.body!.getAll("files").map((f) => (f as File).name)).toEqual(["a.md", "b.txt"]);
    xhr.upload.onprogress!({ loaded: 5, total: 10, lengthComputable: true });
    xhr.upload.onprogress!({ loaded: 0, total: 0, lengthComputable: false });
    xhr.respond(202, { job_id: "j1", files: ["a.md", "b.txt"] });
    expect(await h.promise).toEqual({ job_id: "j1", files: ["a.md", "b.txt"] });
    expect(progress).toEqual([0.5]);
  });

  it("413 and 415 become readable errors", async () => {
    for (const [status, code, want] of [
      [413, "too_large", /^Too large/],
      [415, "unsupported_type", /^Unsupported file type/],
    ] as const) {
      const xhr = new FakeXhr();
      const h = uploadFiles(files, () => {}, () => xhr);
      xhr.respond(status, { error: { code, message: "nope", type: "x" } });
      const e = await h.promise.catch((x: unknown) => x);
      expect(e).toMatchObject({ status, code });
      expect(describeUploadError(e)).toMatch(want);
    }
    const xhr = new FakeXhr();
    const h = uploadFiles(files, () => {}, () => xhr);
    xhr.status = 413;
    xhr.responseText = "<html>nginx</html>";
    xhr.onload!();
    expect(await h.promise.catch((x: unknown) => x)).toMatchObject({ code: "too_large" });
  });

  it("network error and abort", async () => {
    const xhr = new FakeXhr();
    const h = uploadFiles(files, () => {}, () => xhr);
    xhr.onerror!();
    expect(describeUploadError(await h.promise.catch((x: unknown) => x))).toMatch(/could not be reached/);
    const x2 = new FakeXhr();
    const h2 = uploadFiles(files, () => {}, () => x2);
    h2.abort();
    await expect(h2.promise).rejects.toMatchObject({ code: "aborted" });
  });

  it("polls the job every interval until done, reporting each state", async () => {
    const states: IngestJob[] = [
      { job_id: "j", state: "queued", total: 2, done: 0, files: [{ name: "a.md", state: "queued" }, { name: "b.txt", state: "queued" }] },
      { job_id: "j", state: "running", total: 2, done: 1, files: [{ name: "a.md", state: "done", chunks: 3 }, { name: "b.txt", state: "running" }] },
      { job_id: "j", state: "done", total: 2, done: 2, files: [{ name: "a.md", state: "done", chunks: 3 }, { name: "b.txt", state: "failed", error: "empty file" }] },
    ];
    let i = 0;
    const sleeps: number[] = [];
    const seen: string[] = [];
    const job = await pollJob("j", {
      fetchJob: async () => states[Math.min(i++, 2)]!,
      onUpdate: (j) => seen.push(`${j.state}:${Math.round(jobProgress(j) * 100)}`),
      sleep: async (ms) => void sleeps.push(ms),
    });
    expect(job.state).toBe("done");
    expect(seen).toEqual(["queued:0", "running:50", "done:100"]);
    expect(sleeps).toEqual([500, 500]);
  });

  it("tolerates a few blips, stops on a 4xx or when aborted", async () => {
    let n = 0;
    const job = await pollJob("j", {
      fetchJob: async () => {
        if (n++ < 2) throw new ApiError(0, "network", "blip");
        return { job_id: "j", state: "failed", total: 1, done: 0, files: [], message: "disk full" };
      },
      onUpdate: () => {},
      sleep: async () => {},
    });
    expect(job.message).toBe("disk full");
    await expect(pollJob("j", { fetchJob: async () => { throw new ApiError(404, "not_found", "no job"); }, onUpdate: () => {}, sleep: async () => {} })).rejects.toMatchObject({ status: 404 });
    await expect(pollJob("j", { fetchJob: async () => ({ job_id: "j", state: "running", total: 1, done: 0, files: [] }), onUpdate: () => {}, sleep: async () => {}, signal: { aborted: true } })).rejects.toMatchObject({ code: "aborted" });
  });
});

describe("protocol", () => {
  it("parses known events only", () => {
    expect(parseServerEvent('{"type":"pong"}')).toEqual({ type: "pong" });
    expect(parseServerEvent('{"type":"nope"}')).toBeNull();
    expect(parseServerEvent("null")).toBeNull();
    expect(parseServerEvent("{")).toBeNull();
    expect(parseServerEvent(new ArrayBuffer(2))).toBeNull();
  });
  it("reads the room stamp", () => {
    expect(stampOf({ type: "typing", user: "a", state: "start", room: "r", seq: 3, ts: 1 })).toEqual({ room: "r", seq: 3, ts: 1 });
    expect(stampOf({ type: "joined", room: "r", user: "a", members: [], history: [], last_seq: 3 })).toBeNull();
  });
});
