/**
 * The wire protocol of rag_chat: every WebSocket event and every HTTP body the UI uses.
 *
 * Kept in this one file so it can later be generated from (or checked against) the JSON
 * schema the server exports. Mirrors `rag_chat/api/ws.py`, `rag_chat/rooms/service.py` and
 * `rag_chat/chat.py`. Unknown extra fields are allowed everywhere (the server may add some).
 */

// ---------------------------------------------------------------------------------------
// Client → server
// ---------------------------------------------------------------------------------------

/** Room ids (and conversation ids) the server accepts: 1-128 of `[A-Za-z0-9_.:-]`. */
export const ROOM_ID_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;
export const MAX_MESSAGE_CHARS = 8000;
export const MAX_USER_CHARS = 64;

export interface JoinOut {
  type: "join";
  room: string;
  /** Resume: replay every event after it, then live. */
  last_seq?: number;
  /** Display name (only the first join of a connection names it). */
  user?: string;
}

export interface LeaveOut {
  type: "leave";
  room: string;
}

export interface MessageOut {
  type: "message";
  /** 1-8000 characters. */
  text: string;
  /** A joined room… */
  room?: string;
  /** …or a private conversation with the assistant (joined implicitly). */
  conversation_id?: string;
  /** Idempotency key: a re-sent client_id is neither repeated nor answered twice. */
  client_id?: string;
  /** Ask the AI in a room (`@ai` in the text does the same). */
  ai?: boolean;
}

export interface TypingOut {
  type: "typing";
  room: string;
  state: TypingState;
}

export interface CancelOut {
  type: "cancel";
  message_id: string;
  room?: string;
}

/** Answer the question of the room's latest answer (`message_id`) once more: the new answer's
 * `ai.start` names the one it `replaces`. Only whoever asked may; it counts as a question. */
export interface RegenerateOut {
  type: "regenerate";
  room: string;
  message_id: string;
}

/** Change the text of your latest message (`message_id`); one that asks the AI (`ai`, an
 * `@ai` mention, or it was answered) is answered again: `message.edited`, then the new answer,
 * whose `ai.start` names the one it `replaces`. */
export interface EditOut {
  type: "edit";
  room: string;
  message_id: string;
  /** 1-8000 characters. */
  text: string;
  ai?: boolean;
}

export type Rating = "up" | "down";

/** Rate an answer (one rating per user; a new one replaces yours); `rating: null` takes it back. */
export interface RateOut {
  type: "rate";
  room: string;
  message_id: string;
  rating: Rating | null;
  /** Kept as one line, at most 2000 characters. */
  comment?: string;
}

export interface PingOut {
  type: "ping";
}

/** Only needed when the handshake carried no credential (the browser uses its cookie). */
export interface AuthOut {
  type: "auth";
  token: string;
}

export type ClientEvent = JoinOut | LeaveOut | MessageOut | TypingOut | CancelOut | RegenerateOut | EditOut | RateOut | PingOut | AuthOut;

// ---------------------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------------------

export type TypingState = "start" | "stop";

/** Present on every event that went through a room's log. */
export interface RoomStamp {
  room: string;
  /** Room-wide, increasing. */
  seq: number;
  /** Unix seconds. */
  ts: number;
}

export interface MemberInfo {
  user: string;
  connections: number;
}

export interface SourceChunk {
  n: number;
  id: string;
  doc_id: string | null;
  source: string | null;
  title: string | null;
  heading: string | null;
  page: number | null;
  snippet: string;
  score: number;
}

export type FinishReason = "stop" | "length" | "cancelled" | "error";

export interface HistoryMessage {
  id: string;
  role: "user" | "assistant";
  content: string;
  user?: string | null;
  created_at?: number | null;
  sources?: SourceChunk[] | null;
  query?: string | null;
  finish_reason?: string | null;
  /** An answer's cited sources that support the sentence citing them (server-checked). */
  citations?: number[] | null;
  /** An answer's cited sources that support none of the sentences citing them. */
  unsupported?: number[] | null;
  /** Nothing relevant was found: the answer says so, with no sources. */
  no_match?: boolean | null;
  /** An answer in a room: the message it answers. */
  reply_to?: string | null;
  /** An answer's ratings, by who gave them. */
  feedback?: Record<string, { rating: Rating; at: number; comment?: string }> | null;
  /** A message its author edited: when (unix seconds). */
  edited_at?: number | null;
}

/** Not a log event: `joined` carries no seq (its `last_seq` is the log's head). */
export interface JoinedEvent {
  type: "joined";
  room: string;
  user: string;
  members: MemberInfo[];
  history: HistoryMessage[];
  last_seq: number;
}

export interface PresenceEvent extends RoomStamp {
  type: "presence";
  action: "join" | "leave";
  user: string;
  members: MemberInfo[];
}

export interface ChatMessageEvent extends RoomStamp {
  type: "message";
  id: string;
  user: string;
  text: string;
  client_id: string | null;
  ai: boolean;
}

/** A message's new text (its author edited it); a new answer follows when `ai`. */
export interface MessageEditedEvent extends RoomStamp {
  type: "message.edited";
  id: string;
  user: string;
  text: string;
  ai: boolean;
}

export interface TypingEvent extends RoomStamp {
  type: "typing";
  user: string;
  state: TypingState;
  ttl_ms?: number;
}

/** Fields every AI event of a room carries (added by the room service). */
interface AiBase extends RoomStamp {
  message_id: string;
  conversation_id?: string;
  reply_to?: string;
  user?: string;
}

export interface AiStartEvent extends AiBase {
  type: "ai.start";
  /** A regenerated answer: the answer it takes the place of. */
  replaces?: string;
}

export interface AiSourcesEvent extends AiBase {
  type: "ai.sources";
  query: string;
  chunks: SourceChunk[];
}

export interface AiTokenEvent extends AiBase {
  type: "ai.token";
  /** Under backpressure several tokens may arrive concatenated in one delta. */
  delta: string;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}

export interface Timings {
  admit_ms?: number | null;
  retrieval_ms?: number | null;
  ttft_ms?: number | null;
  total_ms?: number | null;
  tokens_per_s?: number | null;
}

export interface AiDoneEvent extends AiBase {
  type: "ai.done";
  finish_reason: "stop" | "length" | "cancelled";
  usage: Usage;
  timings: Timings;
  /** Sources cited by a sentence they support: the server checks every citation. */
  citations: number[];
  persisted: boolean;
  /** Why a reply was cancelled when nobody asked, e.g. "server_shutdown". */
  cancel_reason?: "user" | "abandoned" | "server_shutdown" | null;
  /** Sources cited only by sentences they do not support. */
  unsupported?: number[];
  /** Sources of ai.sources that nothing cites. */
  uncited?: number[];
  /** Retrieval found nothing relevant: the answer says so, without the LLM. */
  no_match?: boolean;
}

export interface AiCancelEvent extends RoomStamp {
  type: "ai.cancel";
  message_id: string;
  /** Who stopped it. */
  user: string;
}

export type ErrorCode =
  | "bad_request"
  | "not_joined"
  | "not_found"
  | "forbidden"
  | "conflict"
  | "unauthorized"
  | "rate_limited"
  | "too_many_replies"
  | "llm_error"
  | "llm_unavailable"
  | "llm_timeout"
  | "memory_unavailable"
  | "retrieval_error"
  | (string & {});

/**
 * An error. Connection-level errors (a bad event) carry `event` (the type of the event that
 * failed) and no room; errors of an AI reply carry the reply's `message_id` and room stamp.
 */
export interface ErrorEvent extends Partial<RoomStamp> {
  type: "error";
  code: ErrorCode;
  message: string;
  /** True when an LLM failed mid-answer: what was streamed stays. */
  partial?: boolean;
  /** Seconds (rate_limited). */
  retry_after?: number;
  /** The type of the client event that failed. */
  event?: string | null;
  message_id?: string;
  conversation_id?: string;
  /** The client_id of the message it refuses. */
  client_id?: string;
}

export interface LeftEvent {
  type: "left";
  room: string;
}

export interface PongEvent {
  type: "pong";
}

/** The answer to `rate`: your rating as kept (null: taken back). */
export interface RatedEvent {
  type: "rated";
  room: string;
  message_id: string;
  rating: Rating | null;
  comment?: string;
}

export type ServerEvent =
  | JoinedEvent
  | PresenceEvent
  | ChatMessageEvent
  | MessageEditedEvent
  | TypingEvent
  | AiStartEvent
  | AiSourcesEvent
  | AiTokenEvent
  | AiDoneEvent
  | AiCancelEvent
  | ErrorEvent
  | LeftEvent
  | PongEvent
  | RatedEvent;

export type ServerEventType = ServerEvent["type"];

export const SERVER_EVENT_TYPES: readonly ServerEventType[] = [
  "joined",
  "presence",
  "message",
  "message.edited",
  "typing",
  "ai.start",
  "ai.sources",
  "ai.token",
  "ai.done",
  "ai.cancel",
  "error",
  "left",
  "pong",
  "rated",
];

/** Parse one text frame; null for anything that is not a known event object. */
export function parseServerEvent(data: unknown): ServerEvent | null {
  if (typeof data !== "string") return null;
  let raw: unknown;
  try {
    raw = JSON.parse(data);
  } catch {
    return null;
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) return null;
  const type = (raw as { type?: unknown }).type;
  if (typeof type !== "string" || !(SERVER_EVENT_TYPES as readonly string[]).includes(type)) {
    return null;
  }
  return raw as ServerEvent;
}

/** The room stamp of an event, when it went through a room log. */
export function stampOf(ev: ServerEvent): RoomStamp | null {
  const e = ev as Partial<RoomStamp>;
  if (typeof e.room === "string" && typeof e.seq === "number" && Number.isFinite(e.seq)) {
    return { room: e.room, seq: e.seq, ts: typeof e.ts === "number" ? e.ts : 0 };
  }
  return null;
}

/** WebSocket close codes the server uses. */
export const CloseCode = {
  GOING_AWAY: 1001,
  POLICY: 1008,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
} as const;

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

export interface ApiErrorBody {
  error: { code: string; message: string; type?: string };
}

export interface AuthInfo {
  mode: "open" | "jwt";
  user: string | null;
}

export interface SessionInfo {
  user: string;
  expires_at: number | string | null;
}

export interface ConversationSummary {
  id: string;
  title: string | null;
  updated_at: number | string | null;
}

export interface ConversationList {
  conversations: ConversationSummary[];
  /** Pass as `before` for the next, older page; null (or absent, older servers): none. */
  next_before?: number | null;
}

export interface ConversationMessages {
  conversation_id: string;
  messages: HistoryMessage[];
}

export interface UploadAccepted {
  job_id: string;
  files: string[];
}

/** One of the caller's uploads (GET /api/documents). */
export interface UploadedDocument {
  name: string;
  bytes: number;
  /** Seconds since the epoch. */
  modified: number;
  /** Chunks in the index; null: not ingested (failed, or still queued). */
  chunks: number | null;
}

export interface DocumentList {
  documents: UploadedDocument[];
}

export type JobState = "queued" | "running" | "done" | "failed";

export interface JobFile {
  name: string;
  state: string;
  chunks?: number | null;
  error?: string | null;
}

export interface IngestJob {
  job_id: string;
  /** "remove": the job takes a document out of the index (DELETE /api/documents/{name}). */
  kind?: "upload" | "remove";
  state: JobState;
  total: number;
  done: number;
  files: JobFile[];
  message?: string | null;
}

// ---------------------------------------------------------------------------------------
// Drift checks against the server's schema (compile time)
// ---------------------------------------------------------------------------------------
// wire.gen.ts is generated from wire.schema.json, which `python -m rag_chat schema` writes
// from the server's own models (a Python test fails when it is stale; tests/wire.test.ts when
// wire.gen.ts is). These lines stop `tsc` when the types above and the server disagree: every
// event the server may send must be one this UI understands, and every event the UI sends one
// the server accepts.
import type * as Wire from "./wire.gen";

type Assert<T extends true> = T;
type Fits<A, B> = [A] extends [B] ? true : false;
export type ServerEventsFit = Assert<Fits<Wire.ServerEvent, ServerEvent>>;
export type ClientEventsFit = Assert<Fits<ClientEvent, Wire.ClientEvent>>;
