/**
 * The resumable WebSocket connection: reconnect with backoff, resume every room where it left
 * off, and an outbox of messages that survives disconnects.
 *
 * - **Resume.** Per room it keeps the `seq` of the last event it delivered. After a reconnect
 *   it sends `join {room, last_seq}` for every room it is in; the server answers `joined`,
 *   then replays exactly the missed events, then goes live.
 * - **No duplicates.** A room event whose seq is not above the room's last seq is dropped
 *   before it reaches the app, so a replay (or an overlap after a rejoin) is never applied
 *   twice.
 * - **Outbox.** A chat message stays in the outbox until the server echoes it (a `message`
 *   event with its `client_id`). It is sent at most once per connection; on every new
 *   connection the unacknowledged ones go out again after the joins. The server ignores a
 *   `client_id` it has seen, so a re-send is never posted or answered twice.
 * - **Rate limits.** `error {code: "rate_limited", retry_after}` pauses the outbox for that
 *   long, then re-sends what was not acknowledged.
 *
 * Everything that touches the outside world (socket, timers, clock, randomness) is injected,
 * so this runs in unit tests without a browser.
 */
import {
  CloseCode,
  parseServerEvent,
  stampOf,
  type ClientEvent,
  type MessageOut,
  type Rating,
  type RateOut,
  type ServerEvent,
  type TypingState,
} from "../protocol";
import { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff";

export type ConnectionStatus = "connected" | "reconnecting" | "offline";

/** Why the connection stopped trying (status "offline" with a reason). */
export type StopReason = "stopped" | "unauthorized" | "forbidden" | "network";

export interface StatusDetail {
  /** Failed attempts in a row. */
  attempt: number;
  /** When the next attempt starts (clock ms), while waiting to reconnect. */
  retryAt: number | null;
  /** Why no attempt is being made, when offline. */
  reason: StopReason | null;
  /** The outbox is paused by a rate limit until then (clock ms). */
  pausedUntil: number | null;
}

/** The subset of the browser WebSocket this uses. */
export interface SocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
};

export interface OutboxEntry {
  clientId: string;
  event: MessageOut & { client_id: string };
  /** Id of the connection it was last sent on (null: not sent on the current one). */
  sentOn: number | null;
  /** How many connections it was sent on. */
  attempts: number;
}

export interface ConnectionOptions {
  url: string | (() => string);
  createSocket: (url: string) => SocketLike;
  /** Every server event, de-duplicated, in order. */
  onEvent: (event: ServerEvent) => void;
  onStatus?: (status: ConnectionStatus, detail: StatusDetail) => void;
  /** Close code 4401: the server wants a sign-in; the connection stops until start(). */
  onAuthRequired?: () => void;
  /** A queued message given up on (rejected by the server, or too many attempts). */
  onMessageFailed?: (clientId: string, reason: string) => void;
  /** The display name sent with each join. */
  user?: () => string | undefined;
  backoff?: BackoffOptions;
  random?: () => number;
  clock?: Clock;
  /** Application-level ping interval; a connection silent for interval + timeout is dropped. */
  heartbeatMs?: number;
  heartbeatTimeoutMs?: number;
  /** A connection open at least this long resets the backoff when it closes. */
  stableMs?: number;
  /** Give up on a message after it was sent on this many connections without an echo. */
  maxAttempts?: number;
}

interface RoomTrack {
  /** Seq of the last delivered event; null: join fresh (no resume). */
  lastSeq: number | null;
  /** The connection on which `joined` last arrived. */
  joinedOn: number;
  /**
   * The server knows the room. A brand-new private conversation is not confirmed until its
   * first event: the server joins it implicitly with its first message, while a `join` for an
   * unknown room would create a *shared* room of that name.
   */
  confirmed: boolean;
}

/** Error codes that reject one message for good (it is not re-sent). */
const FATAL_MESSAGE_ERRORS = new Set(["bad_request", "not_joined", "forbidden", "unauthorized", "not_found"]);

/** Close codes after which an immediate retry would be pointless: wait at least this long. */
const SLOW_RETRY_MS = 2000;

export class ChatConnection {
  private readonly opts: ConnectionOptions;
  private readonly clock: Clock;
  private readonly random: () => number;
  private readonly backoff: BackoffOptions;
  private socket: SocketLike | null = null;
  private socketOpen = false;
  private connId = 0;
  private openedAt = 0;
  private lastHeard = 0;
  private attempt = 0;
  private retryAt: number | null = null;
  private retryTimer: unknown = null;
  private heartbeatTimer: unknown = null;
  private pauseTimer: unknown = null;
  private pausedUntil: number | null = null;
  /** A `retry_after` the server sent on this socket (e.g. too many connections, then 1008). */
  private closeHintMs = 0;
  private running = false;
  private online = true;
  private stopReason: StopReason | null = "stopped";
  private _status: ConnectionStatus = "offline";
  private readonly rooms = new Map<string, RoomTrack>();
  private readonly outbox: OutboxEntry[] = [];
  /** Control events (cancel) queued while offline: sent once on the next connection. */
  private controls: ClientEvent[] = [];

  constructor(opts: ConnectionOptions) {
    this.opts = opts;
    this.clock = opts.clock ?? realClock;
    this.random = opts.random ?? Math.random;
    this.backoff = opts.backoff ?? DEFAULT_BACKOFF;
  }

  // --- lifecycle ---------------------------------------------------------------------

  get status(): ConnectionStatus {
    return this._status;
  }

  get connected(): boolean {
    return this.socketOpen;
  }

  /** Start (or restart after stop / sign-in): connect now. */
  start(): void {
    this.running = true;
    this.stopReason = null;
    this.attempt = 0;
    this.cancelRetry();
    if (!this.socket) this.connect();
  }

  /** Close and stop reconnecting. Rooms and the outbox are kept for a later start(). */
  stop(reason: StopReason = "stopped"): void {
    this.running = false;
    this.stopReason = reason;
    this.cancelRetry();
    this.dropSocket(1000, "client stopped");
    this.setStatus("offline");
  }

  /** The browser's online/offline events. Going online retries at once. */
  setOnline(online: boolean): void {
    if (online === this.online) return;
    this.online = online;
    if (!this.running) return;
    if (!online) {
      if (!this.socketOpen) {
        this.cancelRetry();
        this.setStatus("offline");
      }
      return;
    }
    if (!this.socket) {
      this.attempt = 0;
      this.cancelRetry();
      this.connect();
    }
  }

  // --- rooms -------------------------------------------------------------------------

  /** Join a shared room (or open a past conversation): sent now, and again on reconnect. */
  join(room: string): void {
    const track = this.rooms.get(room);
    if (!track) this.rooms.set(room, { lastSeq: null, joinedOn: 0, confirmed: true });
    else track.confirmed = true;
    if (this.socketOpen) this.sendJoin(room);
  }

  /**
   * Track a brand-new private conversation that the server joins implicitly on its first
   * message (no `join` until the server has confirmed it); resumed from seq 0.
   */
  trackConversation(room: string): void {
    if (!this.rooms.has(room)) this.rooms.set(room, { lastSeq: 0, joinedOn: 0, confirmed: false });
  }

  leave(room: string): void {
    const had = this.rooms.delete(room);
    // queued messages for the room would only earn `not_joined`
    for (let i = this.outbox.length - 1; i >= 0; i--) {
      const e = this.outbox[i]!.event;
      if (e.room === room || e.conversation_id === room) this.outbox.splice(i, 1);
    }
    if (had && this.socketOpen) this.send({ type: "leave", room });
  }

  isTracking(room: string): boolean {
    return this.rooms.has(room);
  }

  lastSeq(room: string): number | null {
    return this.rooms.get(room)?.lastSeq ?? null;
  }

  trackedRooms(): string[] {
    return [...this.rooms.keys()];
  }

  // --- sending -----------------------------------------------------------------------

  /** Queue a chat message; it goes out now if connected, else on the next connection. */
  sendMessage(event: MessageOut & { client_id: string }): void {
    if (this.outbox.some((e) => e.clientId === event.client_id)) return;
    if (event.conversation_id) this.trackConversation(event.conversation_id);
    const entry: OutboxEntry = { clientId: event.client_id, event, sentOn: null, attempts: 0 };
    this.outbox.push(entry);
    this.flushOutbox();
  }

  /** Re-send a message that was given up on (same client_id: never posted twice). */
  retryMessage(event: MessageOut & { client_id: string }): void {
    this.sendMessage(event);
  }

  pending(): readonly OutboxEntry[] {
    return this.outbox;
  }

  /** Typing is only worth sending live; dropped while offline. */
  typing(room: string, state: TypingState): void {
    if (this.socketOpen && this.rooms.has(room)) this.send({ type: "typing", room, state });
  }

  /** Ask for the room's latest answer once more; only live (false while offline: nothing
   * queued, the answer stays as it is). */
  regenerate(room: string, messageId: string): boolean {
    if (!this.socketOpen || !this.rooms.has(room)) return false;
    this.send({ type: "regenerate", room, message_id: messageId });
    return true;
  }

  /** Change the text of my latest message (answered again when it asks the AI); only live
   * (false while offline: nothing queued, the message stays as it is). */
  edit(room: string, messageId: string, text: string, ai: boolean): boolean {
    if (!this.socketOpen || !this.rooms.has(room)) return false;
    this.send({ type: "edit", room, message_id: messageId, text, ai });
    return true;
  }

  /** Rate an answer; only live (false while offline: nothing queued). */
  rate(room: string, messageId: string, rating: Rating | null, comment?: string): boolean {
    if (!this.socketOpen || !this.rooms.has(room)) return false;
    const event: RateOut = { type: "rate", room, message_id: messageId, rating };
    if (comment) event.comment = comment;
    this.send(event);
    return true;
  }

  /** Stop an AI reply; queued while offline (the reply keeps running in its room meanwhile). */
  cancel(messageId: string, room?: string): void {
    const event: ClientEvent = room ? { type: "cancel", message_id: messageId, room } : { type: "cancel", message_id: messageId };
    if (this.socketOpen) this.send(event);
    else this.controls.push(event);
  }

  // --- internals: socket -------------------------------------------------------------

  private url(): string {
    return typeof this.opts.url === "function" ? this.opts.url() : this.opts.url;
  }

  private connect(): void {
    if (!this.running || this.socket) return;
    this.retryAt = null;
    this.setStatus(this.online ? "reconnecting" : "offline");
    const id = ++this.connId;
    let ws: SocketLike;
    try {
      ws = this.opts.createSocket(this.url());
    } catch {
      this.scheduleReconnect(0);
      return;
    }
    this.socket = ws;
    ws.onopen = () => {
      if (this.socket !== ws) return;
      this.onOpen(id);
    };
    ws.onmessage = (ev) => {
      if (this.socket !== ws) return;
      this.onMessage(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.socket !== ws) return;
      this.onClose(ev.code);
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  private onOpen(id: number): void {
    this.socketOpen = true;
    this.closeHintMs = 0;
    this.openedAt = this.clock.now();
    this.lastHeard = this.openedAt;
    this.setStatus("connected");
    for (const [room, track] of this.rooms) if (track.confirmed) this.sendJoin(room);
    const controls = this.controls;
    this.controls = [];
    for (const c of controls) this.send(c);
    for (const e of this.outbox) if (e.sentOn !== id) e.sentOn = null;
    this.flushOutbox();
    // A new conversation whose first message went out before, on a connection that dropped
    // before any event came back: the message (re-sent above, joining implicitly) may have
    // been posted already; a join after it replays the conversation from the start.
    for (const e of this.outbox) {
      const conv = e.event.conversation_id;
      const track = conv ? this.rooms.get(conv) : undefined;
      if (conv && track && !track.confirmed && e.sentOn === id && e.attempts > 1) {
        track.confirmed = true;
        this.sendJoin(conv);
      }
    }
    this.armHeartbeat();
  }

  private onClose(code: number): void {
    const wasOpen = this.socketOpen;
    const openFor = wasOpen ? this.clock.now() - this.openedAt : 0;
    this.detach();
    if (code === CloseCode.UNAUTHORIZED) {
      this.stop("unauthorized");
      this.opts.onAuthRequired?.();
      return;
    }
    if (code === CloseCode.FORBIDDEN) {
      this.stop("forbidden");
      return;
    }
    if (!this.running) return;
    if (wasOpen && openFor >= (this.opts.stableMs ?? 5000)) this.attempt = 0;
    const slow = code === CloseCode.POLICY || code === CloseCode.TRY_AGAIN_LATER;
    this.scheduleReconnect(Math.max(slow ? SLOW_RETRY_MS : 0, this.closeHintMs));
    this.closeHintMs = 0;
  }

  private detach(): void {
    const ws = this.socket;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    this.socket = null;
    this.socketOpen = false;
    this.clearHeartbeat();
    for (const e of this.outbox) e.sentOn = null;
  }

  private dropSocket(code: number, reason: string): void {
    const ws = this.socket;
    this.detach();
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closed */
      }
    }
  }

  private scheduleReconnect(minDelayMs: number): void {
    this.cancelRetry();
    if (!this.running) return;
    if (!this.online) {
      this.setStatus("offline");
      return;
    }
    const delay = Math.max(minDelayMs, backoffDelay(this.attempt, this.random, this.backoff));
    this.attempt += 1;
    this.retryAt = this.clock.now() + delay;
    this.retryTimer = this.clock.setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delay);
    this.setStatus("reconnecting");
  }

  private cancelRetry(): void {
    if (this.retryTimer !== null) this.clock.clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retryAt = null;
  }

  /**
   * Every `heartbeatMs` a ping; if nothing at all arrives within `heartbeatTimeoutMs` after
   * it, the link is dead (a browser may take minutes to notice) and is dropped. Judged by
   * "anything since the ping", not by elapsed time, so a background tab whose timers are
   * throttled is not mistaken for a dead link.
   */
  private armHeartbeat(): void {
    this.clearHeartbeat();
    const every = this.opts.heartbeatMs ?? 20_000;
    if (every <= 0) return;
    const timeout = this.opts.heartbeatTimeoutMs ?? 10_000;
    this.heartbeatTimer = this.clock.setTimeout(() => {
      this.heartbeatTimer = null;
      if (!this.socketOpen) return;
      const sentAt = this.clock.now();
      this.send({ type: "ping" });
      this.heartbeatTimer = this.clock.setTimeout(() => {
        this.heartbeatTimer = null;
        if (!this.socketOpen) return;
        if (this.lastHeard < sentAt) {
          this.dropSocket(4000, "heartbeat timeout");
          this.scheduleReconnect(0);
          return;
        }
        this.armHeartbeat();
      }, timeout);
    }, every);
  }

  private clearHeartbeat(): void {
    if (this.heartbeatTimer !== null) this.clock.clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  private send(event: ClientEvent): boolean {
    if (!this.socket || !this.socketOpen) return false;
    try {
      this.socket.send(JSON.stringify(event));
      return true;
    } catch {
      return false;
    }
  }

  private sendJoin(room: string): void {
    const track = this.rooms.get(room);
    const event: ClientEvent = { type: "join", room };
    if (track && track.lastSeq !== null) event.last_seq = track.lastSeq;
    const user = this.opts.user?.();
    if (user) event.user = user;
    this.send(event);
  }

  private flushOutbox(): void {
    if (!this.socketOpen) return;
    if (this.pausedUntil !== null && this.clock.now() < this.pausedUntil) return;
    const id = this.connId;
    const maxAttempts = this.opts.maxAttempts ?? 5;
    for (const entry of [...this.outbox]) {
      if (entry.sentOn === id) continue;
      if (entry.attempts >= maxAttempts) {
        this.fail(entry.clientId, "not acknowledged by the server");
        continue;
      }
      if (this.send(entry.event)) {
        entry.sentOn = id;
        entry.attempts += 1;
      }
    }
  }

  private fail(clientId: string, reason: string): void {
    const i = this.outbox.findIndex((e) => e.clientId === clientId);
    if (i < 0) return;
    this.outbox.splice(i, 1);
    this.opts.onMessageFailed?.(clientId, reason);
  }

  // --- internals: events -------------------------------------------------------------

  private onMessage(data: unknown): void {
    this.lastHeard = this.clock.now();
    const event = parseServerEvent(data);
    if (!event) return;
    if (event.type === "joined") {
      const track = this.rooms.get(event.room);
      if (!track) return; // left meanwhile
      // fresh join: start at the head. Resume: keep ours, the replay follows. A head below
      // ours means the room's log was reset: start over from its head.
      if (track.lastSeq === null || event.last_seq < track.lastSeq) track.lastSeq = event.last_seq;
      track.joinedOn = this.connId;
      track.confirmed = true;
      this.opts.onEvent(event);
      return;
    }
    const stamp = stampOf(event);
    if (stamp) {
      const track = this.rooms.get(stamp.room);
      if (!track) return; // a room this client is not in (any more)
      if (track.lastSeq !== null && stamp.seq <= track.lastSeq) return; // already applied
      track.lastSeq = stamp.seq;
      track.confirmed = true;
      if (event.type === "message" && event.client_id) {
        const i = this.outbox.findIndex((e) => e.clientId === event.client_id);
        if (i >= 0) this.outbox.splice(i, 1);
      }
      this.opts.onEvent(event);
      return;
    }
    if (event.type === "error") {
      if (typeof event.retry_after === "number" && event.retry_after > 0) this.closeHintMs = event.retry_after * 1000;
      this.onError(event.code, event.event ?? null, event.retry_after);
    }
    if (event.type === "left") this.rooms.delete(event.room);
    this.opts.onEvent(event);
  }

  private onError(code: string, failed: string | null, retryAfter: number | undefined): void {
    if (code === "rate_limited") {
      const seconds = typeof retryAfter === "number" && retryAfter > 0 ? retryAfter : 1;
      this.pausedUntil = this.clock.now() + seconds * 1000;
      // the rejected one is among those in flight: send them all again after the pause
      // (the server drops a client_id it already took)
      for (const e of this.outbox) e.sentOn = null;
      if (this.pauseTimer !== null) this.clock.clearTimeout(this.pauseTimer);
      const rejoin = failed === "join";
      this.pauseTimer = this.clock.setTimeout(() => {
        this.pauseTimer = null;
        this.pausedUntil = null;
        this.emitStatus();
        if (rejoin && this.socketOpen) {
          // a refused join: try the rooms that have not answered `joined` on this connection
          for (const [room, track] of this.rooms) {
            if (track.confirmed && track.joinedOn !== this.connId) this.sendJoin(room);
          }
        }
        this.flushOutbox();
      }, seconds * 1000);
      this.emitStatus();
      return;
    }
    if (failed === "message" && FATAL_MESSAGE_ERRORS.has(code)) {
      // errors come back in the order the messages were sent: the oldest in flight is it
      const entry = this.outbox.find((e) => e.sentOn === this.connId);
      if (entry) this.fail(entry.clientId, code);
    }
  }

  // --- status ------------------------------------------------------------------------

  private setStatus(status: ConnectionStatus): void {
    this._status = status;
    this.emitStatus();
  }

  private emitStatus(): void {
    this.opts.onStatus?.(this._status, {
      attempt: this.attempt,
      retryAt: this.retryAt,
      reason: this._status === "offline" ? (this.stopReason ?? (this.online ? null : "network")) : null,
      pausedUntil: this.pausedUntil,
    });
  }
}
