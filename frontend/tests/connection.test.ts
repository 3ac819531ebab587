import { beforeEach, describe, expect, it } from "vitest";
import { ChatConnection, type ConnectionStatus, type StatusDetail } from "../src/net/connection";
import type { ServerEvent } from "../src/protocol";
import { FakeClock, FakeSocket } from "./fakes";

let clock: FakeClock;
let sockets: FakeSocket[];
let events: ServerEvent[];
let statuses: [ConnectionStatus, StatusDetail][];
let failed: [string, string][];
let authRequired: number;

function make(extra: Partial<ConstructorParameters<typeof ChatConnection>[0]> = {}) {
  return new ChatConnection({
    url: "ws://test/ws",
    createSocket: (url) => {
      const s = new FakeSocket(url);
      sockets.push(s);
      return s;
    },
    onEvent: (e) => events.push(e),
    onStatus: (s, d) => statuses.push([s, d]),
    onAuthRequired: () => authRequired++,
    onMessageFailed: (id, why) => failed.push([id, why]),
    clock,
    random: () => 0.5,
    heartbeatMs: 0,
    ...extra,
  });
}

const last = () => sockets[sockets.length - 1]!;
const stamp = (room: string, seq: number) => ({ room, seq, ts: 1000 + seq });
const token = (room: string, seq: number, delta: string) => ({ type: "ai.token", message_id: "m1", delta, ...stamp(room, seq) });

beforeEach(() => {
  clock = new FakeClock();
  sockets = [];
  events = [];
  statuses = [];
  failed = [];
  authRequired = 0;
});

describe("connection lifecycle", () => {
  it("reports reconnecting while connecting, then connected", () => {
    const c = make();
    expect(c.status).toBe("offline");
    c.start();
    expect(c.status).toBe("reconnecting");
    expect(sockets).toHaveLength(1);
    last().open();
    expect(c.status).toBe("connected");
  });

  it("reconnects with growing, jittered delays and resets after a stable connection", () => {
    const c = make({ random: () => 0 });
    c.start();
    const delays: number[] = [];
    for (let i = 0; i < 5; i++) {
      last().serverClose(1006);
      expect(c.status).toBe("reconnecting");
      delays.push(clock.pending()[0]!);
      clock.advance(delays[i]!);
    }
    // random() = 0: the lower bound, half the ceiling
    expect(delays).toEqual([250, 500, 1000, 2000, 4000]);
    expect(sockets).toHaveLength(6);
    last().open();
    clock.advance(10_000); // stable
    last().serverClose(1012); // server restarting
    expect(clock.pending()[0]).toBe(250);
  });

  it("a connection that drops at once does not reset the backoff", () => {
    const c = make({ random: () => 0 });
    c.start();
    last().serverClose(1006);
    clock.advance(250);
    last().open();
    clock.advance(100);
    last().serverClose(1006);
    expect(clock.pending()[0]).toBe(500);
    expect(c.status).toBe("reconnecting");
  });

  it("waits at least 2 s after policy / too-slow closes", () => {
    make({ random: () => 0 }).start();
    last().open();
    last().serverClose(1013);
    expect(clock.pending()[0]).toBe(2000);
  });

  it("stops on 4401 and asks for sign-in; start() resumes", () => {
    const c = make();
    c.start();
    last().open();
    last().serverClose(4401);
    expect(authRequired).toBe(1);
    expect(c.status).toBe("offline");
    expect(statuses[statuses.length - 1]![1].reason).toBe("unauthorized");
    expect(clock.pending()).toEqual([]);
    c.start();
    expect(sockets).toHaveLength(2);
  });

  it("stops on 4403 (forbidden origin)", () => {
    const c = make();
    c.start();
    last().serverClose(4403);
    expect(c.status).toBe("offline");
    expect(clock.pending()).toEqual([]);
  });

  it("offline pauses retries; online retries at once", () => {
    const c = make();
    c.start();
    last().serverClose(1006);
    c.setOnline(false);
    expect(c.status).toBe("offline");
    expect(clock.pending()).toEqual([]);
    c.setOnline(true);
    expect(sockets).toHaveLength(2);
    expect(c.status).toBe("reconnecting");
  });

  it("stop() closes the socket and does not reconnect", () => {
    const c = make();
    c.start();
    last().open();
    const s = last();
    c.stop();
    expect(s.closed).not.toBeNull();
    expect(c.status).toBe("offline");
    clock.advance(60_000);
    expect(sockets).toHaveLength(1);
  });

  it("ignores events from a replaced socket", () => {
    const c = make();
    c.start();
    const old = last();
    old.open();
    c.join("team");
    old.serverClose(1006);
    clock.advance(1000);
    last().open();
    old.receive({ type: "message", id: "x", user: "bob", text: "late", client_id: null, ai: false, ...stamp("team", 5) });
    expect(events).toEqual([]);
  });

  it("pings on a heartbeat and drops a silent connection", () => {
    const c = make({ heartbeatMs: 1000, heartbeatTimeoutMs: 500 });
    c.start();
    last().open();
    clock.advance(1000);
    expect(last().types()).toContain("ping");
    last().receive({ type: "pong" });
    clock.advance(1000);
    expect(c.status).toBe("connected");
    clock.advance(1000); // the next ping (at 2500) got no answer by 3000
    expect(last().closed?.code).toBe(4000);
    expect(c.status).toBe("reconnecting");
  });

  it("a late timer (background tab) is not a dead link when the pong came", () => {
    const c = make({ heartbeatMs: 1000, heartbeatTimeoutMs: 500 });
    c.start();
    last().open();
    clock.advance(1000);
    last().receive({ type: "pong" });
    clock.t += 60_000; // the tab slept; the check runs late
    clock.advance(1);
    expect(c.status).toBe("connected");
    expect(last().closed).toBeNull();
  });
});

describe("resume", () => {
  it("tracks last_seq per room and re-sends join {room, last_seq} for every room", () => {
    const c = make({ user: () => "alice" });
    c.start();
    last().open();
    c.join("team");
    c.join("ops");
    expect(last().sent).toEqual([
      { type: "join", room: "team", user: "alice" },
      { type: "join", room: "ops", user: "alice" },
    ]);
    last().receive({ type: "joined", room: "team", user: "alice", members: [], history: [], last_seq: 10 });
    last().receive({ type: "joined", room: "ops", user: "alice", members: [], history: [], last_seq: 3 });
    last().receive(token("team", 11, "a"));
    last().receive(token("ops", 4, "x"));
    last().receive(token("team", 12, "b"));
    expect(c.lastSeq("team")).toBe(12);
    expect(c.lastSeq("ops")).toBe(4);

    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().sent).toEqual([
      { type: "join", room: "team", last_seq: 12, user: "alice" },
      { type: "join", room: "ops", last_seq: 4, user: "alice" },
    ]);
  });

  it("replayed events are applied once: the resumed answer continues where it left off", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 0 });
    last().receive(token("team", 1, "Hel"));
    last().receive(token("team", 2, "lo"));
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    // the server answers the resume with joined (its head), then the replay after last_seq=2
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 4 });
    last().receive(token("team", 2, "lo")); // an overlap: already applied
    last().receive(token("team", 3, " wor"));
    last().receive(token("team", 4, "ld"));
    last().receive(token("team", 4, "ld")); // duplicate
    last().receive(token("team", 5, "!"));
    const text = events.filter((e) => e.type === "ai.token").map((e) => (e as { delta: string }).delta).join("");
    expect(text).toBe("Hello world!");
    expect(c.lastSeq("team")).toBe(5);
  });

  it("a fresh join starts at the log's head", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 118 });
    expect(c.lastSeq("team")).toBe(118);
    last().receive(token("team", 118, "old"));
    last().receive(token("team", 119, "new"));
    expect(events.filter((e) => e.type === "ai.token")).toHaveLength(1);
  });

  it("a log that was reset (head below our seq) starts over from its head", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 50 });
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().sent[0]).toMatchObject({ last_seq: 50 });
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 2 });
    last().receive(token("team", 3, "fresh"));
    expect(events.filter((e) => e.type === "ai.token")).toHaveLength(1);
    expect(c.lastSeq("team")).toBe(3);
  });

  it("a new private conversation is joined implicitly by its first message, never by `join`", () => {
    // (a join for a room the server does not know would create a shared room of that name)
    const c = make();
    c.start();
    c.sendMessage({ type: "message", text: "hi", conversation_id: "conv1", client_id: "c1" });
    expect(c.lastSeq("conv1")).toBe(0);
    last().open();
    expect(last().sent).toEqual([{ type: "message", text: "hi", conversation_id: "conv1", client_id: "c1" }]);
    // its first event confirms it: from then on it is resumed with join {last_seq}
    last().receive({ type: "presence", action: "join", user: "g", members: [], ...stamp("conv1", 1) });
    last().receive({ type: "message", id: "m1", user: "g", text: "hi", client_id: "c1", ai: true, ...stamp("conv1", 2) });
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().sent).toEqual([{ type: "join", room: "conv1", last_seq: 2 }]);
  });

  it("a first message that may have been posted before a drop: re-sent, then join from seq 0", () => {
    const c = make();
    c.start();
    last().open();
    c.sendMessage({ type: "message", text: "hi", conversation_id: "conv1", client_id: "c1" });
    last().serverClose(1006); // before any event came back
    clock.advance(60_000);
    last().open();
    expect(last().sent).toEqual([
      { type: "message", text: "hi", conversation_id: "conv1", client_id: "c1" },
      { type: "join", room: "conv1", last_seq: 0 },
    ]);
    // the replay from the start brings the echo: acknowledged
    last().receive({ type: "joined", room: "conv1", user: "g", members: [], history: [], last_seq: 3 });
    last().receive({ type: "message", id: "m1", user: "g", text: "hi", client_id: "c1", ai: true, ...stamp("conv1", 2) });
    expect(c.pending()).toEqual([]);
    expect(c.lastSeq("conv1")).toBe(2);
  });

  it("drops events of rooms it is not in, and forgets a room on leave", () => {
    const c = make();
    c.start();
    last().open();
    last().receive(token("elsewhere", 1, "x"));
    c.join("team");
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 0 });
    c.leave("team");
    expect(last().sent[last().sent.length - 1]).toEqual({ type: "leave", room: "team" });
    last().receive(token("team", 1, "late"));
    last().receive({ type: "left", room: "team" });
    expect(events.map((e) => e.type)).toEqual(["joined", "left"]);
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().sent).toEqual([]);
  });

  it("ignores frames that are not events", () => {
    const c = make();
    c.start();
    last().open();
    last().receiveRaw("not json");
    last().receiveRaw("[1,2]");
    last().receive({ type: "mystery" });
    last().receive({ type: "pong" });
    expect(events.map((e) => e.type)).toEqual(["pong"]);
  });
});

describe("outbox", () => {
  const msg = (id: string, text = id) => ({ type: "message" as const, text, room: "team", client_id: id });

  it("queues while offline and flushes once on connect, after the joins", () => {
    const c = make();
    c.join("team");
    c.sendMessage(msg("c1"));
    c.sendMessage(msg("c2"));
    c.sendMessage(msg("c1")); // the same client_id again: not queued twice
    c.start();
    expect(sockets[0]!.sent).toEqual([]);
    last().open();
    expect(last().types()).toEqual(["join", "message", "message"]);
    expect(last().sent.slice(1).map((e) => e.client_id)).toEqual(["c1", "c2"]);
    // nothing goes out twice on the same connection
    c.sendMessage(msg("c3"));
    expect(last().sent.filter((e) => e.type === "message").map((e) => e.client_id)).toEqual(["c1", "c2", "c3"]);
  });

  it("re-sends unacknowledged messages on a new connection, with the same client_id", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    last().receive({ type: "joined", room: "team", user: "a", members: [], history: [], last_seq: 0 });
    c.sendMessage(msg("c1"));
    c.sendMessage(msg("c2"));
    // c1 echoed, c2 lost with the connection
    last().receive({ type: "message", id: "m1", user: "a", text: "c1", client_id: "c1", ai: false, ...stamp("team", 1) });
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().sent.map((e) => [e.type, e.client_id])).toEqual([
      ["join", undefined],
      ["message", "c2"],
    ]);
    last().receive({ type: "message", id: "m2", user: "a", text: "c2", client_id: "c2", ai: false, ...stamp("team", 2) });
    expect(c.pending()).toEqual([]);
  });

  it("gives up on a message the server rejects", () => {
    const c = make();
    c.start();
    last().open();
    c.sendMessage(msg("c1"));
    last().receive({ type: "error", code: "not_joined", message: "join room 'team' first", event: "message" });
    expect(failed).toEqual([["c1", "not_joined"]]);
    expect(c.pending()).toEqual([]);
    expect(events.map((e) => e.type)).toEqual(["error"]);
  });

  it("gives up after too many connections without an echo", () => {
    const c = make({ maxAttempts: 2 });
    c.start();
    c.sendMessage(msg("c1"));
    for (let i = 0; i < 3; i++) {
      last().open();
      last().serverClose(1006);
      clock.advance(60_000);
    }
    expect(failed).toEqual([["c1", "not acknowledged by the server"]]);
  });

  it("a rate limit pauses the outbox for retry_after, then re-sends what was not echoed", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    c.sendMessage(msg("c1"));
    last().receive({ type: "error", code: "rate_limited", message: "slow down", retry_after: 3, event: "message" });
    expect(statuses[statuses.length - 1]![1].pausedUntil).toBe(3000);
    c.sendMessage(msg("c2"));
    expect(last().sent.filter((e) => e.type === "message")).toHaveLength(1);
    clock.advance(2999);
    expect(last().sent.filter((e) => e.type === "message")).toHaveLength(1);
    clock.advance(1);
    expect(last().sent.filter((e) => e.type === "message").map((e) => e.client_id)).toEqual(["c1", "c1", "c2"]);
    expect(failed).toEqual([]);
  });

  it("queues a cancel while offline and sends it once on reconnect", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    last().serverClose(1006);
    c.cancel("m9", "team");
    clock.advance(60_000);
    last().open();
    expect(last().sent).toEqual([
      { type: "join", room: "team" },
      { type: "cancel", message_id: "m9", room: "team" },
    ]);
    last().serverClose(1006);
    clock.advance(60_000);
    last().open();
    expect(last().types()).toEqual(["join"]);
  });

  it("a regenerate goes out only live, for a joined room; offline nothing is queued", () => {
    const c = make();
    c.start();
    last().open();
    expect(c.regenerate("team", "a1")).toBe(false); // not joined
    c.join("team");
    expect(c.regenerate("team", "a1")).toBe(true);
    expect(last().sent.filter((e) => e.type === "regenerate")).toEqual([{ type: "regenerate", room: "team", message_id: "a1" }]);
    last().serverClose(1006);
    expect(c.regenerate("team", "a1")).toBe(false);
    clock.advance(60_000);
    last().open();
    expect(last().types()).toEqual(["join"]);
  });

  it("an edit goes out only live, for a joined room; offline nothing is queued", () => {
    const c = make();
    c.start();
    last().open();
    expect(c.edit("team", "q1", "new text", true)).toBe(false); // not joined
    c.join("team");
    expect(c.edit("team", "q1", "new text", true)).toBe(true);
    expect(last().sent.filter((e) => e.type === "edit")).toEqual([{ type: "edit", room: "team", message_id: "q1", text: "new text", ai: true }]);
    last().serverClose(1006);
    expect(c.edit("team", "q1", "newer", false)).toBe(false);
    clock.advance(60_000);
    last().open();
    expect(last().types()).toEqual(["join"]);
  });

  it("a rating goes out only live, for a joined room, its comment only when there is one", () => {
    const c = make();
    c.start();
    last().open();
    c.join("team");
    expect(c.rate("team", "a1", "down", "wrong port")).toBe(true);
    expect(c.rate("team", "a1", null)).toBe(true);
    expect(last().sent.filter((e) => e.type === "rate")).toEqual([
      { type: "rate", room: "team", message_id: "a1", rating: "down", comment: "wrong port" },
      { type: "rate", room: "team", message_id: "a1", rating: null },
    ]);
    last().serverClose(1006);
    expect(c.rate("team", "a1", "up")).toBe(false);
  });

  it("typing is sent only live and only for joined rooms", () => {
    const c = make();
    c.join("team");
    c.typing("team", "start");
    c.start();
    last().open();
    c.typing("team", "start");
    c.typing("other", "start");
    expect(last().sent).toEqual([
      { type: "join", room: "team" },
      { type: "typing", room: "team", state: "start" },
    ]);
  });
});

describe("server hints", () => {
  it("waits retry_after before reconnecting after a refusal (too many connections, then 1008)", () => {
    make({ random: () => 0 }).start();
    last().open();
    last().receive({ type: "error", code: "too_many_connections", message: "close a tab", retry_after: 7 });
    last().serverClose(1008);
    expect(clock.pending()[0]).toBe(7000);
  });

  it("a rate-limited join is retried after the pause, for the rooms not joined yet", () => {
    const c = make();
    c.start();
    last().open();
    c.join("a");
    c.join("b");
    last().receive({ type: "joined", room: "a", user: "u", members: [], history: [], last_seq: 1 });
    last().receive({ type: "error", code: "rate_limited", message: "slow down", retry_after: 1, event: "join" });
    clock.advance(1000);
    expect(last().sent.map((e) => `${e.type}:${e.room}`)).toEqual(["join:a", "join:b", "join:b"]);
    expect(c.status).toBe("connected");
  });
});
