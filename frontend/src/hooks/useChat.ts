/**
 * Glue between React and the pure parts: one ChatConnection for the page, the reducer, and
 * the actions the UI calls.
 */
import { useCallback, useEffect, useMemo, useReducer, useRef, useState } from "react";
import {
  ChatConnection,
  type ConnectionStatus,
  type SocketLike,
  type StatusDetail,
} from "../net/connection";
import { newClientId, newConversationId } from "../net/ids";
import type { Rating } from "../protocol";
import { initialState, reduce, streamingReplies, type ChatMessage, type RoomKind } from "../state/chat";

export function wsUrl(): string {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws`;
}

export interface ChatOptions {
  /** Connect (auth settled and not waiting for a sign-in). */
  enabled: boolean;
  /** The display name sent with joins (open mode). */
  name: string;
  onAuthRequired: () => void;
}

const INITIAL_DETAIL: StatusDetail = { attempt: 0, retryAt: null, reason: null, pausedUntil: null };

export function useChat({ enabled, name, onAuthRequired }: ChatOptions) {
  const [state, dispatch] = useReducer(reduce, initialState, (s) => {
    // start with a fresh private conversation, ready for a question
    const id = newConversationId();
    return reduce(s, { type: "open", room: id, kind: "conversation" });
  });
  const [status, setStatus] = useState<ConnectionStatus>("offline");
  const [detail, setDetail] = useState<StatusDetail>(INITIAL_DETAIL);
  const connRef = useRef<ChatConnection | null>(null);
  const nameRef = useRef(name);
  nameRef.current = name;
  const authRef = useRef(onAuthRequired);
  authRef.current = onAuthRequired;

  if (connRef.current === null) {
    connRef.current = new ChatConnection({
      url: wsUrl,
      createSocket: (url) => new WebSocket(url) as unknown as SocketLike,
      onEvent: (event) => dispatch({ type: "server", event, now: Date.now() }),
      onStatus: (s, d) => {
        setStatus(s);
        setDetail(d);
      },
      onAuthRequired: () => authRef.current(),
      onMessageFailed: (clientId, reason) => dispatch({ type: "local.failed", clientId, reason }),
      user: () => nameRef.current.trim() || undefined,
    });
  }
  const conn = connRef.current;

  useEffect(() => {
    if (!enabled) {
      conn.stop();
      return;
    }
    conn.setOnline(typeof navigator === "undefined" ? true : navigator.onLine !== false);
    conn.start();
    const online = () => conn.setOnline(true);
    const offline = () => conn.setOnline(false);
    window.addEventListener("online", online);
    window.addEventListener("offline", offline);
    return () => {
      window.removeEventListener("online", online);
      window.removeEventListener("offline", offline);
      conn.stop();
    };
  }, [enabled, conn]);

  // typing indicators and rate-limit banners expire with time
  useEffect(() => {
    const t = setInterval(() => dispatch({ type: "tick", now: Date.now() }), 1000);
    return () => clearInterval(t);
  }, []);

  const stateRef = useRef(state);
  stateRef.current = state;

  const joinRoom = useCallback(
    (room: string) => {
      dispatch({ type: "open", room, kind: "room" });
      conn.join(room);
    },
    [conn],
  );

  const leaveRoom = useCallback(
    (room: string) => {
      conn.leave(room);
      dispatch({ type: "close", room });
    },
    [conn],
  );

  const newConversation = useCallback(() => {
    // reuse an empty draft rather than piling them up
    const s = stateRef.current;
    const draft = s.order.find((id) => {
      const r = s.rooms[id]!;
      return r.kind === "conversation" && r.items.length === 0 && !conn.isTracking(id);
    });
    const id = draft ?? newConversationId();
    dispatch({ type: "open", room: id, kind: "conversation" });
    return id;
  }, [conn]);

  const openConversation = useCallback(
    (id: string, title: string | null) => {
      dispatch({ type: "open", room: id, kind: "conversation", title });
      if (!conn.isTracking(id)) conn.join(id);
    },
    [conn],
  );

  const closeConversation = useCallback(
    (id: string) => {
      if (conn.isTracking(id)) conn.leave(id);
      dispatch({ type: "close", room: id });
    },
    [conn],
  );

  const select = useCallback((room: string) => dispatch({ type: "select", room }), []);
  const renamed = useCallback((room: string, title: string) => dispatch({ type: "rename", room, title }), []);

  const send = useCallback(
    (text: string, askAi: boolean) => {
      const s = stateRef.current;
      const room = s.active ? s.rooms[s.active] : undefined;
      if (!room) return;
      const clientId = newClientId();
      dispatch({ type: "local.message", room: room.id, kind: room.kind, clientId, text, ai: askAi, now: Date.now() });
      conn.sendMessage(outgoing(room.kind, room.id, text, clientId, askAi));
    },
    [conn],
  );

  const retry = useCallback(
    (roomId: string, m: ChatMessage) => {
      const room = stateRef.current.rooms[roomId];
      if (!room || !m.clientId) return;
      dispatch({ type: "local.retry", clientId: m.clientId });
      conn.retryMessage(outgoing(room.kind, room.id, m.text, m.clientId, Boolean(m.askedAi)));
    },
    [conn],
  );

  const stop = useCallback(() => {
    const s = stateRef.current;
    const room = s.active ? s.rooms[s.active] : undefined;
    for (const r of streamingReplies(room)) conn.cancel(r.id, room!.id);
  }, [conn]);

  const regenerate = useCallback(
    (roomId: string, messageId: string) => {
      conn.regenerate(roomId, messageId);
    },
    [conn],
  );

  const edit = useCallback(
    (roomId: string, messageId: string, text: string, ai: boolean) => conn.edit(roomId, messageId, text, ai),
    [conn],
  );

  const rate = useCallback(
    (roomId: string, messageId: string, rating: Rating | null, comment?: string) => {
      conn.rate(roomId, messageId, rating, comment);
    },
    [conn],
  );

  const typing = useCallback(
    (roomId: string, st: "start" | "stop") => {
      if (stateRef.current.rooms[roomId]?.kind === "room") conn.typing(roomId, st);
    },
    [conn],
  );

  const setMe = useCallback((user: string | null) => dispatch({ type: "me", user }), []);
  const dismissBanner = useCallback(() => dispatch({ type: "banner", banner: null }), []);

  const actions = useMemo(
    () => ({ joinRoom, leaveRoom, newConversation, openConversation, closeConversation, renamed, select, send, retry, regenerate, edit, rate, stop, typing, setMe, dismissBanner }),
    [joinRoom, leaveRoom, newConversation, openConversation, closeConversation, renamed, select, send, retry, regenerate, edit, rate, stop, typing, setMe, dismissBanner],
  );

  return { state, status, detail, actions, isTracking: (id: string) => conn.isTracking(id) };
}

function outgoing(kind: RoomKind, room: string, text: string, clientId: string, askAi: boolean) {
  return kind === "room"
    ? { type: "message" as const, text, room, client_id: clientId, ...(askAi ? { ai: true } : {}) }
    : { type: "message" as const, text, conversation_id: room, client_id: clientId };
}
