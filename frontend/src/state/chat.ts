/**
 * The chat state and its reducer: every server event, and the local actions (a message typed
 * here, a room opened or closed). Pure: time comes in with the action.
 *
 * Events arrive de-duplicated and in seq order per room (see net/connection.ts); the reducer
 * is still idempotent where it cheaply can be (messages by id, history merged by id).
 */
import type {
  AiDoneEvent,
  HistoryMessage,
  MemberInfo,
  Rating,
  ServerEvent,
  SourceChunk,
  Timings,
  Usage,
} from "../protocol";

export type RoomKind = "room" | "conversation";

export interface ChatMessage {
  kind: "message";
  /** Server id; `local:<client_id>` while a message of ours is not echoed yet. */
  id: string;
  role: "user" | "ai";
  user: string;
  text: string;
  /** Unix seconds. */
  ts: number;
  clientId?: string | null;
  mine?: boolean;
  /** Ours, not seen back from the server yet (queued or in flight). */
  pending?: boolean;
  /** Ours, given up on: why. */
  failed?: string;
  /** A user message that asks the AI. */
  askedAi?: boolean;
  /** A user message its author edited: when (unix seconds). */
  editedAt?: number;
  // --- AI replies ---
  streaming?: boolean;
  replyTo?: string | null;
  query?: string | null;
  sources?: SourceChunk[];
  /** After ai.done: the sources that support the sentences citing them. */
  citations?: number[];
  /** Cited, but supporting none of the sentences that cite them. */
  unsupported?: number[];
  /** Shown, never cited. */
  uncited?: number[];
  /** Nothing in the documents matched: the answer says so and has no sources. */
  noMatch?: boolean;
  finishReason?: "stop" | "length" | "cancelled" | "error" | null;
  cancelledBy?: string;
  cancelReason?: string;
  error?: { code: string; message: string; partial: boolean };
  usage?: Usage;
  timings?: Timings;
  /** My rating of an answer (as the server kept it). */
  rating?: Rating | null;
}

export interface Notice {
  kind: "notice";
  id: string;
  ts: number;
  text: string;
  tone: "info" | "error";
}

export type TimelineItem = ChatMessage | Notice;

export interface RoomState {
  id: string;
  kind: RoomKind;
  title: string | null;
  /** A `joined` arrived (or, for a conversation, any event). */
  joined: boolean;
  /** My name in this room (from `joined`). */
  me: string | null;
  members: MemberInfo[];
  items: TimelineItem[];
  /** user → when their typing indicator expires (ms, the reducer's clock). */
  typing: Record<string, number>;
  unread: number;
}

export interface Banner {
  code: string;
  message: string;
  /** ms (reducer clock) until which a rate limit holds. */
  until?: number;
}

export interface ChatState {
  rooms: Record<string, RoomState>;
  /** Sidebar order. */
  order: string[];
  active: string | null;
  /** The signed-in user or chosen display name. */
  me: string | null;
  banner: Banner | null;
}

export type Action =
  /** A server event; `now` in ms. */
  | { type: "server"; event: ServerEvent; now: number }
  | { type: "open"; room: string; kind: RoomKind; title?: string | null; activate?: boolean }
  | { type: "close"; room: string }
  /** A conversation given a title by its owner (it replaces the one it had). */
  | { type: "rename"; room: string; title: string }
  | { type: "select"; room: string }
  | {
      type: "local.message";
      room: string;
      kind: RoomKind;
      clientId: string;
      text: string;
      ai: boolean;
      now: number;
    }
  | { type: "local.failed"; clientId: string; reason: string }
  | { type: "local.retry"; clientId: string }
  | { type: "tick"; now: number }
  | { type: "me"; user: string | null }
  | { type: "banner"; banner: Banner | null };

export const TYPING_TTL_MS = 6000;
export const AI_USER = "ai";

export const initialState: ChatState = { rooms: {}, order: [], active: null, me: null, banner: null };

export function newRoom(id: string, kind: RoomKind = "room", title: string | null = null): RoomState {
  return { id, kind, title, joined: false, me: null, members: [], items: [], typing: {}, unread: 0 };
}

// ---------------------------------------------------------------------------------------

export function reduce(state: ChatState, action: Action): ChatState {
  switch (action.type) {
    case "server":
      return onServer(state, action.event, action.now);
    case "open": {
      const existing = state.rooms[action.room];
      const room = existing ?? newRoom(action.room, action.kind, action.title ?? null);
      const titled = existing && action.title && !existing.title ? { ...existing, title: action.title } : room;
      const next = withRoom(state, titled);
      return action.activate === false ? next : select(next, action.room);
    }
    case "rename": {
      const room = state.rooms[action.room];
      if (!room || room.title === action.title) return state;
      return { ...state, rooms: { ...state.rooms, [action.room]: { ...room, title: action.title } } };
    }
    case "close": {
      if (!state.rooms[action.room]) return state;
      const rooms = { ...state.rooms };
      delete rooms[action.room];
      const order = state.order.filter((r) => r !== action.room);
      const active = state.active === action.room ? (order[0] ?? null) : state.active;
      return { ...state, rooms, order, active };
    }
    case "select":
      return select(state, action.room);
    case "local.message": {
      let room = state.rooms[action.room] ?? newRoom(action.room, action.kind);
      const msg: ChatMessage = {
        kind: "message",
        id: `local:${action.clientId}`,
        role: "user",
        user: room.me ?? state.me ?? "you",
        text: action.text,
        ts: action.now / 1000,
        clientId: action.clientId,
        mine: true,
        pending: true,
        askedAi: action.ai || room.kind === "conversation",
      };
      room = { ...room, items: [...room.items, msg] };
      if (room.kind === "conversation" && !room.title) room.title = titleFrom(action.text);
      return withRoom(state, room);
    }
    case "local.failed":
      return mapMessages(state, (m) =>
        m.clientId === action.clientId && m.pending ? { ...m, failed: action.reason } : m,
      );
    case "local.retry":
      return mapMessages(state, (m) =>
        m.clientId === action.clientId && m.pending ? { ...m, failed: undefined } : m,
      );
    case "tick": {
      let changed = false;
      const rooms: Record<string, RoomState> = {};
      for (const [id, room] of Object.entries(state.rooms)) {
        const typing = expireTyping(room.typing, action.now);
        if (typing !== room.typing) {
          changed = true;
          rooms[id] = { ...room, typing };
        } else rooms[id] = room;
      }
      let banner = state.banner;
      if (banner?.until !== undefined && banner.until <= action.now) {
        banner = null;
        changed = true;
      }
      return changed ? { ...state, rooms, banner } : state;
    }
    case "me":
      return state.me === action.user ? state : { ...state, me: action.user };
    case "banner":
      return { ...state, banner: action.banner };
  }
}

function select(state: ChatState, room: string): ChatState {
  const r = state.rooms[room];
  if (!r) return state.active === room ? state : { ...state, active: room };
  const rooms = r.unread ? { ...state.rooms, [room]: { ...r, unread: 0 } } : state.rooms;
  return { ...state, rooms, active: room };
}

function withRoom(state: ChatState, room: RoomState): ChatState {
  const order = state.order.includes(room.id) ? state.order : [...state.order, room.id];
  return { ...state, rooms: { ...state.rooms, [room.id]: room }, order };
}

function mapMessages(state: ChatState, f: (m: ChatMessage) => ChatMessage): ChatState {
  let changed = false;
  const rooms: Record<string, RoomState> = {};
  for (const [id, room] of Object.entries(state.rooms)) {
    let roomChanged = false;
    const items = room.items.map((it) => {
      if (it.kind !== "message") return it;
      const m = f(it);
      if (m !== it) roomChanged = true;
      return m;
    });
    rooms[id] = roomChanged ? { ...room, items } : room;
    changed ||= roomChanged;
  }
  return changed ? { ...state, rooms } : state;
}

function expireTyping(typing: Record<string, number>, now: number): Record<string, number> {
  let out: Record<string, number> | null = null;
  for (const [user, until] of Object.entries(typing)) {
    if (until <= now) {
      out ??= { ...typing };
      delete out[user];
    }
  }
  return out ?? typing;
}

export function titleFrom(text: string): string {
  const line = text.trim().split("\n")[0] ?? "";
  return line.length > 60 ? line.slice(0, 57) + "…" : line;
}

// ---------------------------------------------------------------------------------------

function onServer(state: ChatState, ev: ServerEvent, now: number): ChatState {
  switch (ev.type) {
    case "pong":
      return state;
    case "left": {
      return reduce(state, { type: "close", room: ev.room });
    }
    case "rated": {
      const room = state.rooms[ev.room];
      if (!room || !findMessage(room, ev.message_id)) return state;
      return updateAi(state, room, ev.message_id, undefined, (m) => ({ ...m, rating: ev.rating }));
    }
    case "joined": {
      const room = state.rooms[ev.room] ?? newRoom(ev.room);
      return withRoom(state, {
        ...room,
        joined: true,
        me: ev.user,
        members: ev.members ?? [],
        typing: {},
        items: mergeHistory(room, ev.history ?? [], ev.user),
      });
    }
    case "error": {
      if (ev.room && state.rooms[ev.room]) {
        const room = state.rooms[ev.room]!;
        if (ev.event === "regenerate" || ev.event === "edit") {
          // refused: the answer (or message) it names stays as it was
          const what = ev.event === "edit" ? "Could not edit" : "Could not answer again";
          return withRoom(state, addNotice(room, now / 1000, `${what}: ${ev.message}`, "error", `err:${ev.event}:${now}`));
        }
        if (ev.message_id) {
          return updateAi(state, room, ev.message_id, ev.ts, (m) => ({
            ...m,
            streaming: false,
            finishReason: "error",
            error: { code: ev.code, message: ev.message, partial: Boolean(ev.partial) },
          }));
        }
        return withRoom(state, addNotice(room, ev.ts ?? now / 1000, `${ev.message}`, "error", `err:${ev.seq ?? now}`));
      }
      const banner: Banner = { code: ev.code, message: ev.message };
      if (typeof ev.retry_after === "number" && ev.retry_after > 0) banner.until = now + ev.retry_after * 1000;
      return { ...state, banner };
    }
    default:
      break;
  }
  // room events
  const existing = state.rooms[ev.room];
  let room = existing ?? newRoom(ev.room);
  if (room.kind === "conversation" && !room.joined) room = { ...room, joined: true };
  switch (ev.type) {
    case "presence": {
      room = { ...room, members: ev.members ?? room.members };
      if (ev.action === "leave" && room.typing[ev.user] !== undefined) {
        const typing = { ...room.typing };
        delete typing[ev.user];
        room.typing = typing;
      }
      if (room.kind === "room" && ev.user !== room.me) {
        const text = ev.action === "join" ? `${ev.user} joined` : `${ev.user} left`;
        room = addNotice(room, ev.ts, text, "info", `presence:${ev.seq}`);
      }
      return withRoom(state, room);
    }
    case "typing": {
      if (ev.user === room.me) return existing ? state : withRoom(state, room);
      const typing = { ...room.typing };
      if (ev.state === "start") typing[ev.user] = now + (ev.ttl_ms ?? TYPING_TTL_MS);
      else delete typing[ev.user];
      return withRoom(state, { ...room, typing });
    }
    case "message": {
      const typing = dropKey(room.typing, ev.user);
      const items = room.items;
      const mineById = ev.client_id ? items.findIndex((it) => it.kind === "message" && it.clientId === ev.client_id && it.mine) : -1;
      if (items.some((it) => it.id === ev.id)) return withRoom(state, { ...room, typing });
      const msg: ChatMessage = {
        kind: "message",
        id: ev.id,
        role: "user",
        user: ev.user,
        text: ev.text,
        ts: ev.ts,
        clientId: ev.client_id,
        mine: mineById >= 0 || room.kind === "conversation" || (room.me !== null && ev.user === room.me),
        askedAi: ev.ai,
      };
      let nextItems: TimelineItem[];
      if (mineById >= 0) {
        nextItems = [...items];
        nextItems[mineById] = msg;
      } else nextItems = [...items, msg];
      const title = room.title ?? (room.kind === "conversation" ? titleFrom(ev.text) : null);
      return bump(state, { ...room, typing, items: nextItems, title });
    }
    case "message.edited": {
      const at = room.items.findIndex((it) => it.kind === "message" && it.id === ev.id);
      if (at < 0) return withRoom(state, room);
      const items = [...room.items];
      items[at] = { ...(items[at] as ChatMessage), text: ev.text, editedAt: ev.ts, askedAi: ev.ai || undefined };
      return withRoom(state, { ...room, items });
    }
    case "ai.start": {
      if (findMessage(room, ev.message_id)) return withRoom(state, room);
      const fresh = aiMessage(ev.message_id, ev.ts, ev.reply_to);
      // a regenerated answer takes the place of the one it replaces
      const at = ev.replaces ? room.items.findIndex((it) => it.kind === "message" && it.id === ev.replaces) : -1;
      if (at >= 0) {
        const items = [...room.items];
        items[at] = fresh;
        return bump(state, { ...room, items });
      }
      return bump(state, { ...room, items: [...room.items, fresh] });
    }
    case "ai.sources":
      return updateAi(state, room, ev.message_id, ev.ts, (m) => ({ ...m, sources: ev.chunks ?? [], query: ev.query }));
    case "ai.token":
      return updateAi(state, room, ev.message_id, ev.ts, (m) =>
        m.finishReason ? m : { ...m, text: m.text + (ev.delta ?? ""), streaming: true },
      );
    case "ai.done":
      return updateAi(state, room, ev.message_id, ev.ts, (m) => done(m, ev));
    case "ai.cancel":
      if (!findMessage(room, ev.message_id)) return withRoom(state, room);
      return updateAi(state, room, ev.message_id, ev.ts, (m) => ({ ...m, cancelledBy: ev.user }));
  }
}

function done(m: ChatMessage, ev: AiDoneEvent): ChatMessage {
  const out: ChatMessage = {
    ...m,
    streaming: false,
    finishReason: ev.finish_reason,
    citations: ev.citations ?? [],
    usage: ev.usage,
    timings: ev.timings,
  };
  if (Array.isArray(ev.unsupported)) out.unsupported = ev.unsupported;
  if (Array.isArray(ev.uncited)) out.uncited = ev.uncited;
  if (ev.no_match === true) out.noMatch = true;
  if (typeof ev.cancel_reason === "string") out.cancelReason = ev.cancel_reason;
  return out;
}

function aiMessage(id: string, ts: number, replyTo?: string | null): ChatMessage {
  return {
    kind: "message",
    id,
    role: "ai",
    user: AI_USER,
    text: "",
    ts,
    streaming: true,
    replyTo: replyTo ?? null,
    finishReason: null,
  };
}

function findMessage(room: RoomState, id: string): ChatMessage | undefined {
  for (const it of room.items) if (it.kind === "message" && it.id === id) return it;
  return undefined;
}

/** Update an AI message, creating it when its ai.start was missed (joined mid-answer). */
function updateAi(
  state: ChatState,
  room: RoomState,
  id: string,
  ts: number | undefined,
  f: (m: ChatMessage) => ChatMessage,
): ChatState {
  const i = room.items.findIndex((it) => it.kind === "message" && it.id === id);
  if (i < 0) {
    const created = f(aiMessage(id, ts ?? 0));
    return bump(state, { ...room, items: [...room.items, created] });
  }
  const items = [...room.items];
  items[i] = f(items[i] as ChatMessage);
  return withRoom(state, { ...room, items });
}

/** Store a room that got a new message or reply: unread count when it is not in view. */
function bump(state: ChatState, room: RoomState): ChatState {
  const unread = state.active === room.id ? 0 : room.unread + 1;
  return withRoom(state, { ...room, unread });
}

function addNotice(room: RoomState, ts: number, text: string, tone: Notice["tone"], id: string): RoomState {
  if (room.items.some((it) => it.id === id)) return room;
  return { ...room, items: [...room.items, { kind: "notice", id, ts, text, tone }] };
}

function dropKey(rec: Record<string, number>, key: string): Record<string, number> {
  if (rec[key] === undefined) return rec;
  const out = { ...rec };
  delete out[key];
  return out;
}

export function fromHistory(h: HistoryMessage, me: string | null, kind: RoomKind): ChatMessage {
  const ai = h.role === "assistant";
  const msg: ChatMessage = {
    kind: "message",
    id: h.id,
    role: ai ? "ai" : "user",
    user: ai ? AI_USER : (h.user ?? me ?? "you"),
    text: h.content ?? "",
    ts: typeof h.created_at === "number" ? h.created_at : 0,
  };
  if (ai) {
    msg.sources = h.sources ?? [];
    msg.query = h.query ?? null;
    const fr = h.finish_reason;
    msg.finishReason = fr === "stop" || fr === "length" || fr === "cancelled" || fr === "error" ? fr : "stop";
    msg.streaming = false;
    if (typeof h.reply_to === "string") msg.replyTo = h.reply_to;
    const mine = me !== null ? h.feedback?.[me]?.rating : undefined;
    if (mine === "up" || mine === "down") msg.rating = mine;
    if (Array.isArray(h.citations)) msg.citations = h.citations;
    if (Array.isArray(h.unsupported)) msg.unsupported = h.unsupported;
    if (h.no_match === true) msg.noMatch = true;
  } else {
    msg.mine = kind === "conversation" || (h.user != null && h.user === me);
    if (typeof h.edited_at === "number") msg.editedAt = h.edited_at;
  }
  return msg;
}

/**
 * Merge `history` into what a room already shows: by id, what is already there wins (a reply
 * still streaming keeps its text, the replay completes it) except a message's edited text;
 * then by time, stable.
 */
export function mergeHistory(room: RoomState, history: HistoryMessage[], me: string | null): TimelineItem[] {
  if (!history.length) return room.items;
  const edits = new Map(history.filter((h) => h && h.role === "user" && typeof h.edited_at === "number").map((h) => [h.id, h]));
  const items = edits.size
    ? room.items.map((it) => {
        const h = it.kind === "message" ? edits.get(it.id) : undefined;
        return h && it.kind === "message" && it.editedAt !== h.edited_at ? { ...it, text: h.content ?? it.text, editedAt: h.edited_at ?? undefined } : it;
      })
    : room.items;
  const have = new Set(items.map((it) => it.id));
  const added = history.filter((h) => h && typeof h.id === "string" && !have.has(h.id)).map((h) => fromHistory(h, me, room.kind));
  if (!added.length) return items;
  const all = [...added, ...items];
  return all
    .map((it, i) => ({ it, i }))
    .sort((a, b) => a.it.ts - b.it.ts || a.i - b.i)
    .map((x) => x.it);
}

// ---------------------------------------------------------------------------------------
// Selectors

export function typingUsers(room: RoomState | undefined, now: number): string[] {
  if (!room) return [];
  return Object.entries(room.typing)
    .filter(([user, until]) => until > now && user !== room.me)
    .map(([user]) => user)
    .sort();
}

export function typingLine(users: string[]): string {
  if (users.length === 0) return "";
  if (users.length === 1) return `${users[0]} is typing…`;
  if (users.length === 2) return `${users[0]} and ${users[1]} are typing…`;
  return `${users.length} people are typing…`;
}

/** The AI replies still streaming in a room (the Stop button stops these). */
export function streamingReplies(room: RoomState | undefined): ChatMessage[] {
  if (!room) return [];
  return room.items.filter((it): it is ChatMessage => it.kind === "message" && it.role === "ai" && Boolean(it.streaming));
}

/**
 * The answer in a room that may be asked for again (`regenerate`), or null: the room's latest
 * message, a finished answer, nothing streaming, and its question one of mine (in a private
 * conversation every question is). The question is the one it replies to, else (an answer
 * from history saved without `reply_to`) the last user message before it. The server checks
 * the same.
 */
export function regenerable(room: RoomState | undefined): string | null {
  if (!room) return null;
  const messages = room.items.filter((it): it is ChatMessage => it.kind === "message");
  const last = messages[messages.length - 1];
  if (!last || last.role !== "ai" || last.streaming || !last.finishReason) return null;
  if (messages.some((m) => m.streaming)) return null;
  let question: ChatMessage | undefined;
  for (let i = messages.length - 2; i >= 0; i--) {
    const m = messages[i]!;
    if (m.role !== "user") continue;
    if (!last.replyTo || m.id === last.replyTo) {
      question = m;
      break;
    }
  }
  if (!question) return null;
  return room.kind === "conversation" || question.mine ? last.id : null;
}

/**
 * The message in a room I may edit (`edit`), or null: my latest message (in a private
 * conversation every question is mine), sent, followed only by its own answer (finished) and
 * by others' messages no answer replies to, nothing streaming, not an answer. The server
 * checks the same.
 */
export function editable(room: RoomState | undefined): string | null {
  if (!room || !room.joined) return null;
  const messages = room.items.filter((it): it is ChatMessage => it.kind === "message");
  if (messages.some((m) => m.streaming || m.pending || m.failed)) return null;
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i]!;
    if (m.role === "user" && (room.kind === "conversation" || m.mine)) {
      const later = messages.slice(i + 1);
      const ok = later.every((x) => (x.role === "ai" ? !x.replyTo || x.replyTo === m.id : !(room.kind === "conversation" || x.mine)));
      return ok && later.filter((x) => x.role === "ai").length <= 1 ? m.id : null;
    }
  }
  return null;
}
