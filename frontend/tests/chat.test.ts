import { describe, expect, it } from "vitest";
import {
  editable,
  initialState,
  reduce,
  regenerable,
  streamingReplies,
  typingLine,
  typingUsers,
  type Action,
  type ChatMessage,
  type ChatState,
  type Notice,
} from "../src/state/chat";
import type { ServerEvent, SourceChunk } from "../src/protocol";

let seqs: Record<string, number> = {};
function ev(room: string, e: Record<string, unknown>): ServerEvent {
  seqs[room] = (seqs[room] ?? 0) + 1;
  return { room, seq: seqs[room], ts: 1_700_000_000 + seqs[room]!, ...e } as unknown as ServerEvent;
}
const srv = (event: ServerEvent, now = 0): Action => ({ type: "server", event, now });
const run = (state: ChatState, ...actions: Action[]) => actions.reduce(reduce, state);
const msgs = (s: ChatState, room: string) => s.rooms[room]!.items.filter((i): i is ChatMessage => i.kind === "message");
const notices = (s: ChatState, room: string) => s.rooms[room]!.items.filter((i): i is Notice => i.kind === "notice");

const chunk = (n: number): SourceChunk => ({
  n, id: `c${n}`, doc_id: `doc${n}.md`, source: `data/doc${n}.md`, title: `Doc ${n}`, heading: "H", page: null, snippet: `snippet ${n}`, score: 0.5,
});
const joined = (room: string, user: string, extra: Record<string, unknown> = {}): ServerEvent =>
  ({ type: "joined", room, user, members: [{ user, connections: 1 }], history: [], last_seq: 0, ...extra }) as ServerEvent;

function joinedState(...rooms: string[]): ChatState {
  seqs = {};
  let s = initialState;
  for (const r of rooms) s = run(s, { type: "open", room: r, kind: "room" }, srv(joined(r, "alice")));
  return run(s, { type: "select", room: rooms[0]! });
}

describe("reducer: rooms and presence", () => {
  it("joined sets members and me, loads history", () => {
    seqs = {};
    const s = run(
      initialState,
      { type: "open", room: "team", kind: "room" },
      srv(joined("team", "alice", {
        members: [{ user: "alice", connections: 1 }, { user: "bob", connections: 2 }],
        history: [
          { id: "h1", role: "user", content: "what port?", user: "bob", created_at: 10 },
          { id: "h2", role: "assistant", content: "8000 [1]", created_at: 11, sources: [chunk(1)] },
        ],
        last_seq: 40,
      })),
    );
    const room = s.rooms.team!;
    expect(room.joined).toBe(true);
    expect(room.me).toBe("alice");
    expect(room.members.map((m) => m.user)).toEqual(["alice", "bob"]);
    const m = msgs(s, "team");
    expect(m.map((x) => [x.role, x.text, x.user])).toEqual([["user", "what port?", "bob"], ["ai", "8000 [1]", "ai"]]);
    expect(m[1]!.sources).toHaveLength(1);
    expect(m[1]!.streaming).toBe(false);
    expect(m[0]!.mine).toBe(false);
  });

  it("presence updates members and adds join/leave notices (not for me)", () => {
    let s = joinedState("team");
    s = run(
      s,
      srv(ev("team", { type: "presence", action: "join", user: "alice", members: [{ user: "alice", connections: 1 }] })),
      srv(ev("team", { type: "presence", action: "join", user: "bob", members: [{ user: "alice", connections: 1 }, { user: "bob", connections: 1 }] })),
      srv(ev("team", { type: "presence", action: "leave", user: "bob", members: [{ user: "alice", connections: 1 }] })),
    );
    expect(s.rooms.team!.members.map((m) => m.user)).toEqual(["alice"]);
    expect(notices(s, "team").map((n) => n.text)).toEqual(["bob joined", "bob left"]);
  });

  it("re-joining merges history without duplicating what is shown", () => {
    let s = joinedState("team");
    s = run(s, srv(ev("team", { type: "message", id: "m1", user: "bob", text: "hi", client_id: null, ai: false })));
    s = run(s, srv(joined("team", "alice", { history: [{ id: "m1", role: "user", content: "hi", user: "bob", created_at: 1 }, { id: "m0", role: "user", content: "earlier", user: "bob", created_at: 0.5 }] })));
    expect(msgs(s, "team").map((m) => m.id)).toEqual(["m0", "m1"]);
  });

  it("a renamed conversation takes its new title; its first question no longer names it", () => {
    seqs = {};
    let s = run(initialState, { type: "open", room: "c1", kind: "conversation", title: "Which port?" });
    s = run(s, { type: "rename", room: "c1", title: "Ports" });
    expect(s.rooms.c1!.title).toBe("Ports");
    s = run(s, { type: "open", room: "c1", kind: "conversation", title: "Which port?" }); // reopened from an old list
    expect(s.rooms.c1!.title).toBe("Ports");
    expect(run(s, { type: "rename", room: "gone", title: "x" })).toBe(s); // not open: nothing to do
    expect(run(s, { type: "rename", room: "c1", title: "Ports" })).toBe(s);
  });

  it("left removes the room", () => {
    let s = joinedState("team", "ops");
    s = run(s, srv({ type: "left", room: "team" }));
    expect(s.rooms.team).toBeUndefined();
    expect(s.order).toEqual(["ops"]);
    expect(s.active).toBe("ops");
  });
});

describe("reducer: messages", () => {
  it("a local message is pending until the server echoes its client_id, then replaced in place", () => {
    let s = joinedState("team");
    s = run(s, { type: "local.message", room: "team", kind: "room", clientId: "c1", text: "@ai hello", ai: false, now: 5000 });
    expect(msgs(s, "team")[0]).toMatchObject({ id: "local:c1", pending: true, mine: true, user: "alice" });
    s = run(s, srv(ev("team", { type: "message", id: "m1", user: "bob", text: "yo", client_id: "b1", ai: false })));
    s = run(s, srv(ev("team", { type: "message", id: "m2", user: "alice", text: "@ai hello", client_id: "c1", ai: true })));
    const m = msgs(s, "team");
    expect(m.map((x) => x.id)).toEqual(["m2", "m1"]);
    expect(m[0]).toMatchObject({ mine: true, askedAi: true });
    expect(m[0]!.pending).toBeUndefined();
    expect(m[1]!.mine).toBe(false);
  });

  it("the same message id is never added twice", () => {
    let s = joinedState("team");
    const e = ev("team", { type: "message", id: "m1", user: "bob", text: "yo", client_id: null, ai: false });
    s = run(s, srv(e), srv(e));
    expect(msgs(s, "team")).toHaveLength(1);
  });

  it("marks a failed local message, and clears it on retry", () => {
    let s = joinedState("team");
    s = run(s, { type: "local.message", room: "team", kind: "room", clientId: "c1", text: "x", ai: false, now: 0 }, { type: "local.failed", clientId: "c1", reason: "not_joined" });
    expect(msgs(s, "team")[0]!.failed).toBe("not_joined");
    s = run(s, { type: "local.retry", clientId: "c1" });
    expect(msgs(s, "team")[0]!.failed).toBeUndefined();
  });

  it("counts unread messages in rooms not in view", () => {
    let s = joinedState("team", "ops");
    s = run(s, srv(ev("ops", { type: "message", id: "m1", user: "bob", text: "yo", client_id: null, ai: false })));
    expect(s.rooms.ops!.unread).toBe(1);
    expect(s.rooms.team!.unread).toBe(0);
    s = run(s, { type: "select", room: "ops" });
    expect(s.rooms.ops!.unread).toBe(0);
  });
});

describe("reducer: AI replies", () => {
  const start = (room: string, id = "r1") => ev(room, { type: "ai.start", message_id: id, conversation_id: room, reply_to: "m1", user: "ai" });
  const tok = (room: string, delta: string, id = "r1") => ev(room, { type: "ai.token", message_id: id, delta });

  it("accumulates tokens (also coalesced ones), sources, then done", () => {
    let s = joinedState("team");
    s = run(
      s,
      srv(start("team")),
      srv(ev("team", { type: "ai.sources", message_id: "r1", query: "port?", chunks: [chunk(1), chunk(2)] })),
      srv(tok("team", "It uses")),
      srv(tok("team", " port 8000 [1].\n\n- a\n- b")),
    );
    let r = msgs(s, "team")[0]!;
    expect(r).toMatchObject({ role: "ai", streaming: true, text: "It uses port 8000 [1].\n\n- a\n- b", query: "port?", replyTo: "m1" });
    expect(r.sources).toHaveLength(2);
    expect(streamingReplies(s.rooms.team)).toHaveLength(1);
    s = run(s, srv(ev("team", { type: "ai.done", message_id: "r1", finish_reason: "stop", usage: { prompt_tokens: 10, completion_tokens: 5 }, timings: { total_ms: 100 }, citations: [1], persisted: true, unsupported: [2], cancel_reason: undefined, extra_future_field: 1 })));
    r = msgs(s, "team")[0]!;
    expect(r).toMatchObject({ streaming: false, finishReason: "stop", citations: [1], unsupported: [2] });
    expect(r.uncited).toBeUndefined();
    expect(r.noMatch).toBeUndefined();
    expect(streamingReplies(s.rooms.team)).toHaveLength(0);
    // a stray token after done changes nothing
    s = run(s, srv(tok("team", "zzz")));
    expect(msgs(s, "team")[0]!.text).toBe(r.text);
  });

  it("done carries the citation check: uncited sources, and no_match for a don't-know answer", () => {
    let s = joinedState("team");
    s = run(
      s,
      srv(ev("team", { type: "ai.start", message_id: "r1", user: "ai", conversation_id: "team" })),
      srv(ev("team", { type: "ai.sources", message_id: "r1", query: "q", chunks: [chunk(1), chunk(2), chunk(3)] })),
      srv(tok("team", "A [1]. B [2].")),
      srv(ev("team", { type: "ai.done", message_id: "r1", finish_reason: "stop", usage: { prompt_tokens: 1, completion_tokens: 1 }, timings: {}, citations: [1], unsupported: [2], uncited: [3], persisted: true })),
      srv(ev("team", { type: "ai.start", message_id: "r2", user: "ai", conversation_id: "team" })),
      srv(ev("team", { type: "ai.sources", message_id: "r2", query: "off topic", chunks: [] })),
      srv(tok("team", "I don't know.", "r2")),
      srv(ev("team", { type: "ai.done", message_id: "r2", finish_reason: "stop", usage: { prompt_tokens: 0, completion_tokens: 0 }, timings: {}, citations: [], unsupported: [], uncited: [], no_match: true, persisted: true })),
    );
    const [r1, r2] = msgs(s, "team");
    expect(r1).toMatchObject({ citations: [1], unsupported: [2], uncited: [3] });
    expect(r2).toMatchObject({ citations: [], sources: [], noMatch: true, streaming: false, text: "I don't know." });
  });

  it("keeps interleaved replies in different rooms apart", () => {
    let s = joinedState("team", "ops");
    s = run(
      s,
      srv(start("team", "a")),
      srv(start("ops", "b")),
      srv(tok("team", "one ", "a")),
      srv(tok("ops", "uno ", "b")),
      srv(tok("team", "two", "a")),
      srv(ev("ops", { type: "ai.done", message_id: "b", finish_reason: "length", usage: { prompt_tokens: 1, completion_tokens: 1 }, timings: {}, citations: [], persisted: true })),
      srv(tok("ops", "ignored", "b")),
    );
    expect(msgs(s, "team")[0]).toMatchObject({ text: "one two", streaming: true });
    expect(msgs(s, "ops")[0]).toMatchObject({ text: "uno ", streaming: false, finishReason: "length" });
  });

  it("interleaved replies in one room", () => {
    let s = joinedState("team");
    s = run(s, srv(start("team", "a")), srv(start("team", "b")), srv(tok("team", "A", "a")), srv(tok("team", "B", "b")), srv(tok("team", "A", "a")));
    expect(msgs(s, "team").map((m) => m.text)).toEqual(["AA", "B"]);
  });

  it("creates the reply when joined mid-answer (ai.start missed)", () => {
    let s = joinedState("team");
    s = run(s, srv(tok("team", "…rest")));
    expect(msgs(s, "team")[0]).toMatchObject({ id: "r1", role: "ai", text: "…rest", streaming: true });
  });

  it("cancel: who stopped it, then done(cancelled)", () => {
    let s = joinedState("team");
    s = run(s, srv(start("team")), srv(tok("team", "Par")), srv(ev("team", { type: "ai.cancel", message_id: "r1", user: "bob" })), srv(ev("team", { type: "ai.done", message_id: "r1", finish_reason: "cancelled", usage: { prompt_tokens: 0, completion_tokens: 0 }, timings: {}, citations: [], persisted: false })));
    expect(msgs(s, "team")[0]).toMatchObject({ text: "Par", cancelledBy: "bob", finishReason: "cancelled", streaming: false });
    // a cancel for an unknown reply creates nothing
    s = run(s, srv(ev("team", { type: "ai.cancel", message_id: "nope", user: "bob" })));
    expect(msgs(s, "team")).toHaveLength(1);
  });

  it("an LLM error mid-answer keeps the partial text", () => {
    let s = joinedState("team");
    s = run(s, srv(start("team")), srv(tok("team", "Half an ans")), srv(ev("team", { type: "error", message_id: "r1", conversation_id: "team", code: "llm_error", message: "the model crashed", partial: true })));
    expect(msgs(s, "team")[0]).toMatchObject({ text: "Half an ans", streaming: false, finishReason: "error", error: { code: "llm_error", partial: true } });
  });

  it("connection-level errors become a banner; rate limits expire with tick", () => {
    let s = joinedState("team");
    s = run(s, srv({ type: "error", code: "bad_request", message: "text: too short", event: "message" }, 1000));
    expect(s.banner).toEqual({ code: "bad_request", message: "text: too short" });
    s = run(s, srv({ type: "error", code: "rate_limited", message: "slow down", retry_after: 2 }, 1000));
    expect(s.banner).toMatchObject({ code: "rate_limited", until: 3000 });
    s = run(s, { type: "tick", now: 2999 });
    expect(s.banner).not.toBeNull();
    s = run(s, { type: "tick", now: 3000 });
    expect(s.banner).toBeNull();
  });

  it("a room error without a reply becomes a notice in the room", () => {
    let s = joinedState("team");
    s = run(s, srv(ev("team", { type: "error", code: "too_many_replies", message: "one reply at a time" })));
    expect(notices(s, "team").map((n) => [n.tone, n.text])).toEqual([["error", "one reply at a time"]]);
  });
});

describe("reducer: typing", () => {
  it("shows others typing until stop, a message, or the ttl", () => {
    let s = joinedState("team");
    s = run(
      s,
      srv(ev("team", { type: "typing", user: "bob", state: "start", ttl_ms: 6000 }), 1000),
      srv(ev("team", { type: "typing", user: "carol", state: "start" }), 1000),
      srv(ev("team", { type: "typing", user: "alice", state: "start" }), 1000), // me
    );
    expect(typingUsers(s.rooms.team, 1000)).toEqual(["bob", "carol"]);
    expect(typingLine(typingUsers(s.rooms.team, 1000))).toBe("bob and carol are typing…");
    s = run(s, srv(ev("team", { type: "message", id: "m1", user: "carol", text: "hi", client_id: null, ai: false }), 2000));
    expect(typingLine(typingUsers(s.rooms.team, 2000))).toBe("bob is typing…");
    expect(typingUsers(s.rooms.team, 7001)).toEqual([]);
    s = run(s, { type: "tick", now: 7001 });
    expect(s.rooms.team!.typing).toEqual({});
    s = run(s, srv(ev("team", { type: "typing", user: "bob", state: "start" }), 8000), srv(ev("team", { type: "typing", user: "bob", state: "stop" }), 8100));
    expect(typingUsers(s.rooms.team, 8100)).toEqual([]);
  });

  it("a leave clears typing; three or more are counted", () => {
    let s = joinedState("team");
    for (const u of ["b", "c", "d"]) s = run(s, srv(ev("team", { type: "typing", user: u, state: "start" }), 0));
    expect(typingLine(typingUsers(s.rooms.team, 0))).toBe("3 people are typing…");
    s = run(s, srv(ev("team", { type: "presence", action: "leave", user: "b", members: [] }), 0));
    expect(typingUsers(s.rooms.team, 0)).toEqual(["c", "d"]);
    expect(typingLine([])).toBe("");
  });
});

describe("reducer: private conversations", () => {
  it("implicit join: events without `joined`, my messages are mine, titled by the first question", () => {
    seqs = {};
    let s = run(initialState, { type: "open", room: "c0ffee", kind: "conversation" });
    s = run(
      s,
      { type: "local.message", room: "c0ffee", kind: "conversation", clientId: "k1", text: "How do I ingest PDFs?", ai: false, now: 0 },
      srv(ev("c0ffee", { type: "presence", action: "join", user: "guest-1", members: [{ user: "guest-1", connections: 1 }] })),
      srv(ev("c0ffee", { type: "message", id: "q1", user: "guest-1", text: "How do I ingest PDFs?", client_id: "k1", ai: true })),
      srv(ev("c0ffee", { type: "ai.start", message_id: "a1", conversation_id: "c0ffee", reply_to: "q1", user: "ai" })),
    );
    const room = s.rooms.c0ffee!;
    expect(room.joined).toBe(true);
    expect(room.title).toBe("How do I ingest PDFs?");
    expect(notices(s, "c0ffee")).toEqual([]);
    expect(msgs(s, "c0ffee").map((m) => [m.id, m.role, m.mine ?? false])).toEqual([["q1", "user", true], ["a1", "ai", false]]);
  });

  it("history from joined marks the user's turns as mine", () => {
    seqs = {};
    const s = run(
      initialState,
      { type: "open", room: "conv", kind: "conversation" },
      srv(joined("conv", "alice", { history: [{ id: "u", role: "user", content: "q", created_at: 1 }, { id: "a", role: "assistant", content: "ans", created_at: 2, finish_reason: "cancelled" }] })),
    );
    expect(msgs(s, "conv").map((m) => [m.mine ?? false, m.finishReason ?? null])).toEqual([[true, null], [false, "cancelled"]]);
  });

  it("history keeps an answer's checked citations and a no-match answer", () => {
    seqs = {};
    const s = run(
      initialState,
      { type: "open", room: "conv", kind: "conversation" },
      srv(
        joined("conv", "alice", {
          history: [
            { id: "a", role: "assistant", content: "Port 8000 [1]. Also [2].", created_at: 1, sources: [chunk(1), chunk(2), chunk(3)], citations: [1], unsupported: [2] },
            { id: "b", role: "assistant", content: "I don't know.", created_at: 2, sources: [], citations: [], no_match: true },
          ],
        }),
      ),
    );
    const [a, b] = msgs(s, "conv");
    expect(a).toMatchObject({ citations: [1], unsupported: [2] });
    expect(a!.noMatch).toBeUndefined();
    expect(b).toMatchObject({ citations: [], noMatch: true, sources: [] });
  });
});

describe("regenerate: asking for the latest answer again", () => {
  const done = (room: string, id: string) =>
    ev(room, { type: "ai.done", message_id: id, conversation_id: room, user: "ai", finish_reason: "stop", usage: { prompt_tokens: 1, completion_tokens: 1 }, timings: {}, citations: [] });
  const token = (room: string, id: string, delta: string) => ev(room, { type: "ai.token", message_id: id, user: "ai", delta });
  const question = (room: string, id: string, user: string, text = "what port?") =>
    ev(room, { type: "message", id, user, text, client_id: null, ai: true });
  const start = (room: string, id: string, replyTo: string, replaces?: string) =>
    ev(room, { type: "ai.start", message_id: id, conversation_id: room, reply_to: replyTo, user: "ai", ...(replaces ? { replaces } : {}) });

  it("is offered on the latest finished answer to my question, and not while it streams", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice")), srv(start("team", "a1", "q1")), srv(token("team", "a1", "8000")));
    expect(regenerable(s.rooms.team)).toBeNull();
    s = run(s, srv(done("team", "a1")));
    expect(regenerable(s.rooms.team)).toBe("a1");
    // someone wrote since: no longer the latest
    s = run(s, srv(ev("team", { type: "message", id: "m2", user: "bob", text: "thanks", client_id: null, ai: false })));
    expect(regenerable(s.rooms.team)).toBeNull();
  });

  it("is not offered for someone else's question in a room, always in a private conversation", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "bob")), srv(start("team", "a1", "q1")), srv(done("team", "a1")));
    expect(regenerable(s.rooms.team)).toBeNull();
    seqs = {};
    let c = run(initialState, { type: "open", room: "conv", kind: "conversation" });
    c = run(
      c,
      srv(joined("conv", "guest-1", { history: [{ id: "u", role: "user", content: "q", created_at: 1 }, { id: "a", role: "assistant", content: "ans", created_at: 2, finish_reason: "stop", reply_to: "u" }] })),
    );
    expect(regenerable(c.rooms.conv)).toBe("a");
  });

  it("the new answer takes the old one's place and streams there", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice")), srv(start("team", "a1", "q1")), srv(token("team", "a1", "old")), srv(done("team", "a1")));
    s = run(s, srv(start("team", "a2", "q1", "a1")), srv(token("team", "a2", "new")));
    expect(msgs(s, "team").map((m) => [m.id, m.text, m.streaming ?? false])).toEqual([
      ["q1", "what port?", false],
      ["a2", "new", true],
    ]);
    s = run(s, srv(done("team", "a2")));
    expect(regenerable(s.rooms.team)).toBe("a2");
  });

  it("an answer it replaces that is not shown (joined later) just adds the new one", () => {
    let s = joinedState("team");
    s = run(s, srv(start("team", "a2", "q1", "a1")));
    expect(msgs(s, "team").map((m) => m.id)).toEqual(["a2"]);
  });

  it("a refused regenerate is a notice in its room, and the answer stays as it was", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice")), srv(start("team", "a1", "q1")), srv(token("team", "a1", "8000")), srv(done("team", "a1")));
    s = run(s, srv({ type: "error", code: "conflict", message: "'a1' is not the latest answer in 'team'", event: "regenerate", room: "team", message_id: "a1" } as ServerEvent, 5000));
    const a1 = msgs(s, "team")[1]!;
    expect([a1.text, a1.finishReason, a1.error]).toEqual(["8000", "stop", undefined]);
    expect(notices(s, "team").map((n) => [n.text, n.tone])).toEqual([["Could not answer again: 'a1' is not the latest answer in 'team'", "error"]]);
  });
});

describe("edit: changing my latest message", () => {
  const question = (room: string, id: string, user: string, text = "what port?", ai = true) =>
    ev(room, { type: "message", id, user, text, client_id: null, ai });
  const start = (room: string, id: string, replyTo: string, replaces?: string) =>
    ev(room, { type: "ai.start", message_id: id, conversation_id: room, reply_to: replyTo, user: "ai", ...(replaces ? { replaces } : {}) });
  const done = (room: string, id: string) =>
    ev(room, { type: "ai.done", message_id: id, conversation_id: room, user: "ai", finish_reason: "stop", usage: { prompt_tokens: 1, completion_tokens: 1 }, timings: {}, citations: [] });
  const edited = (room: string, id: string, user: string, text: string, ai: boolean) => ev(room, { type: "message.edited", id, user, text, ai });

  it("is offered on my latest message once its answer is done; others' later messages do not stop it", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice")), srv(start("team", "a1", "q1")));
    expect(editable(s.rooms.team)).toBeNull(); // streaming
    s = run(s, srv(done("team", "a1")));
    expect(editable(s.rooms.team)).toBe("q1");
    s = run(s, srv(question("team", "m2", "bob", "thanks", false)));
    expect(editable(s.rooms.team)).toBe("q1");
    // bob asked the AI and got an answer: the conversation moved on
    s = run(s, srv(start("team", "a2", "m2")), srv(done("team", "a2")));
    expect(editable(s.rooms.team)).toBeNull();
    // my newer message is the one to edit, never someone else's
    s = run(s, srv(question("team", "m3", "alice", "ok", false)));
    expect(editable(s.rooms.team)).toBe("m3");
    s = run(s, srv(question("team", "m4", "bob", "hi", false)));
    expect(editable(s.rooms.team)).toBe("m3");
  });

  it("message.edited changes the text where it is and marks it edited; the new answer replaces the old", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice")), srv(start("team", "a1", "q1")), srv(done("team", "a1")));
    s = run(s, srv(edited("team", "q1", "alice", "which port does Redis use?", true)), srv(start("team", "a2", "q1", "a1")));
    const [q, a] = msgs(s, "team");
    expect([q!.id, q!.text, q!.editedAt, q!.askedAi]).toEqual(["q1", "which port does Redis use?", 1_700_000_004, true]);
    expect([msgs(s, "team").length, a!.id, a!.streaming]).toEqual([2, "a2", true]);
    // an edit of a message not shown is ignored
    const before = s;
    s = run(s, srv(edited("team", "nope", "bob", "x", false)));
    expect(msgs(s, "team")).toEqual(msgs(before, "team"));
  });

  it("history shows an edit, also of a message already on the page; a refused edit is a notice", () => {
    let s = joinedState("team");
    s = run(s, srv(question("team", "q1", "alice", "helo", false)));
    s = run(s, srv(joined("team", "alice", { history: [{ id: "q1", role: "user", content: "hello", user: "alice", created_at: 1, edited_at: 9 }] })));
    expect(msgs(s, "team").map((m) => [m.id, m.text, m.editedAt])).toEqual([["q1", "hello", 9]]);
    s = run(s, srv({ type: "error", code: "conflict", message: "only the latest message can be edited; 'q1' is not", event: "edit", room: "team", message_id: "q1" } as ServerEvent, 5000));
    expect(msgs(s, "team")[0]!.text).toBe("hello");
    expect(notices(s, "team").map((n) => n.text)).toEqual(["Could not edit: only the latest message can be edited; 'q1' is not"]);
  });
});

describe("ratings", () => {
  it("rated sets my rating of the answer; null takes it back; unknown answers are ignored", () => {
    let s = joinedState("team");
    s = run(
      s,
      srv(ev("team", { type: "message", id: "q1", user: "alice", text: "port?", client_id: null, ai: true })),
      srv(ev("team", { type: "ai.start", message_id: "a1", conversation_id: "team", reply_to: "q1", user: "ai" })),
    );
    s = run(s, srv({ type: "rated", room: "team", message_id: "a1", rating: "down", comment: "wrong" } as ServerEvent));
    expect(msgs(s, "team")[1]!.rating).toBe("down");
    s = run(s, srv({ type: "rated", room: "team", message_id: "a1", rating: null } as ServerEvent));
    expect(msgs(s, "team")[1]!.rating).toBeNull();
    const same = run(s, srv({ type: "rated", room: "team", message_id: "zz", rating: "up" } as ServerEvent));
    expect(same).toBe(s);
  });

  it("history gives my rating, not someone else's", () => {
    seqs = {};
    const feedback = { alice: { rating: "up", at: 1 }, bob: { rating: "down", at: 2 } };
    const s = run(
      initialState,
      { type: "open", room: "team", kind: "room" },
      srv(joined("team", "alice", { history: [{ id: "a", role: "assistant", content: "x", created_at: 1, feedback }] })),
      { type: "open", room: "other", kind: "room" },
      srv(joined("other", "carol", { history: [{ id: "b", role: "assistant", content: "y", created_at: 1, feedback }] })),
    );
    expect(msgs(s, "team")[0]!.rating).toBe("up");
    expect(msgs(s, "other")[0]!.rating).toBeUndefined();
  });
});
