import { useCallback, useEffect, useLayoutEffect, useRef, useState } from "react";
import { isNearBottom } from "../state/scroll";
import { editable, regenerable, type ChatMessage, type RoomState } from "../state/chat";
import type { Rating } from "../protocol";
import { MessageView, type OpenSource } from "./MessageView";
import { timeOf } from "./format";

interface Props {
  room: RoomState;
  offline: boolean;
  onOpenSource: (s: OpenSource) => void;
  onRetry: (m: ChatMessage) => void;
  onRegenerate: (m: ChatMessage) => void;
  /** Send my latest message's new text; false when it could not be sent (offline). */
  onEdit: (m: ChatMessage, text: string) => boolean;
  /** Changes when the editable message's editor should open (Up in the empty composer). */
  editRequest: number;
  onRate: (m: ChatMessage, rating: Rating | null) => void;
  empty: React.ReactNode;
}

/**
 * The messages of a room. Follows the stream while the reader is at the bottom; once they
 * scroll up it stays put and offers "Jump to latest".
 */
export function Timeline({ room, offline, onOpenSource, onRetry, onRegenerate, onEdit, editRequest, onRate, empty }: Props) {
  const again = offline ? null : regenerable(room);
  const editId = offline ? null : editable(room);
  const box = useRef<HTMLDivElement>(null);
  const [stick, setStick] = useState(true);
  const stickRef = useRef(true);

  // instant, not smooth: a smooth scroll's intermediate positions would read as "the reader
  // scrolled up" while the stream keeps growing
  const toBottom = useCallback(() => {
    const el = box.current;
    if (!el) return;
    el.scrollTop = el.scrollHeight;
    stickRef.current = true;
    setStick(true);
  }, []);

  // a room switch starts at the bottom
  useLayoutEffect(() => {
    toBottom();
  }, [room.id, toBottom]);

  // new items or more tokens: follow if following
  const last = room.items[room.items.length - 1];
  const lastLen = last && last.kind === "message" ? last.text.length : 0;
  useLayoutEffect(() => {
    if (stickRef.current && box.current) box.current.scrollTop = box.current.scrollHeight;
  }, [room.items.length, lastLen, last]);

  // images do not load, but fonts and <details> may change heights: keep following
  useEffect(() => {
    const el = box.current;
    if (!el || typeof ResizeObserver === "undefined") return;
    const ro = new ResizeObserver(() => {
      if (stickRef.current) el.scrollTop = el.scrollHeight;
    });
    for (const child of Array.from(el.children)) ro.observe(child);
    return () => ro.disconnect();
  }, [room.items.length]);

  const onScroll = () => {
    const el = box.current;
    if (!el) return;
    const near = isNearBottom(el);
    if (near !== stickRef.current) {
      stickRef.current = near;
      setStick(near);
    }
  };

  return (
    <div className="timeline-wrap">
      <div
        ref={box}
        className="timeline"
        onScroll={onScroll}
        role="log"
        aria-label={room.kind === "room" ? `Messages in ${room.id}` : "Conversation with the assistant"}
        aria-live="polite"
        aria-relevant="additions"
        tabIndex={0}
      >
        <div className="timeline-inner">
          {room.items.length === 0 && empty}
          {room.items.map((item) =>
            item.kind === "notice" ? (
              <p key={item.id} className={`notice ${item.tone}`}>
                {item.text}
                {timeOf(item.ts) && <time dateTime={timeOf(item.ts)!.iso}> · {timeOf(item.ts)!.short}</time>}
              </p>
            ) : (
              <MessageView key={item.clientId ? `c:${item.clientId}` : item.id} msg={item} privateChat={room.kind === "conversation"} offline={offline} onOpenSource={onOpenSource} onRetry={onRetry} onRegenerate={item.id === again ? onRegenerate : undefined} onEdit={item.id === editId ? onEdit : undefined} editRequest={editRequest} onRate={offline ? undefined : onRate} />
            ),
          )}
        </div>
      </div>
      {!stick && (
        <button type="button" className="jump" onClick={() => {
            toBottom();
            box.current?.focus({ preventScroll: true });
          }}>
          Jump to latest ↓
        </button>
      )}
    </div>
  );
}
