import { useEffect, useRef, useState, type FormEvent, type KeyboardEvent } from "react";
import { MAX_MESSAGE_CHARS } from "../protocol";
import { TypingThrottle } from "../net/typing";
import type { RoomKind } from "../state/chat";

interface Props {
  roomId: string;
  kind: RoomKind;
  streaming: boolean;
  offline: boolean;
  onSend: (text: string, askAi: boolean) => void;
  onStop: () => void;
  onTyping: (room: string, state: "start" | "stop") => void;
  /** Up in the empty composer: edit my latest message; false when there is none to edit. */
  onEditLast?: () => boolean;
}

/** Enter sends, Shift+Enter is a newline, Up in an empty composer edits my latest message;
 * typing start/stop throttled for rooms. */
export function Composer({ roomId, kind, streaming, offline, onSend, onStop, onTyping, onEditLast }: Props) {
  const [text, setText] = useState("");
  const [askAi, setAskAi] = useState(false);
  const area = useRef<HTMLTextAreaElement>(null);
  const throttle = useRef(new TypingThrottle());

  // a room switch: stop typing in the old one, keep focus in the composer
  useEffect(() => {
    const t = throttle.current;
    // not on touch screens: focusing would pop up the keyboard
    if (typeof matchMedia === "function" && matchMedia("(pointer: fine)").matches) area.current?.focus({ preventScroll: true });
    return () => {
      if (t.stop() && kind === "room") onTyping(roomId, "stop");
    };
  }, [roomId]);

  // grow with the text, up to a limit (CSS max-height)
  useEffect(() => {
    const el = area.current;
    if (!el) return;
    el.style.height = "auto";
    el.style.height = `${el.scrollHeight}px`;
  }, [text]);

  const trimmed = text.trim();
  const tooLong = text.length > MAX_MESSAGE_CHARS;

  const submit = (e?: FormEvent) => {
    e?.preventDefault();
    if (!trimmed || tooLong) return;
    onSend(trimmed, kind === "room" && askAi);
    if (throttle.current.stop()) onTyping(roomId, "stop");
    setText("");
  };

  const onKeyDown = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape" && streaming) {
      onStop();
    } else if (e.key === "ArrowUp" && !text && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && onEditLast?.()) {
      e.preventDefault();
    }
  };

  const onChange = (value: string) => {
    setText(value);
    if (kind !== "room") return;
    const what = throttle.current.input(Date.now(), value.trim().length > 0);
    if (what) onTyping(roomId, what);
  };

  const placeholder = kind === "room" ? `Message #${roomId} — @ai asks the assistant` : "Ask about your documents…";

  return (
    <form className="composer" onSubmit={submit} aria-label="Send a message">
      {offline && <p className="composer-hint">Offline — messages are queued and sent when the connection is back.</p>}
      {tooLong && (
        <p className="composer-hint error" role="alert">
          {text.length - MAX_MESSAGE_CHARS} characters over the {MAX_MESSAGE_CHARS} limit.
        </p>
      )}
      <div className="composer-row">
        <label htmlFor="composer" className="sr-only">
          {kind === "room" ? `Message #${roomId}` : "Your question"}
        </label>
        <textarea
          id="composer"
          ref={area}
          data-testid="composer"
          rows={1}
          value={text}
          placeholder={placeholder}
          onChange={(e) => onChange(e.target.value)}
          onKeyDown={onKeyDown}
          onBlur={() => {
            if (throttle.current.stop()) onTyping(roomId, "stop");
          }}
          aria-describedby="composer-help"
          enterKeyHint="send"
        />
        {kind === "room" && (
          <button
            type="button"
            className={askAi ? "toggle on" : "toggle"}
            aria-pressed={askAi}
            onClick={() => setAskAi((v) => !v)}
            title="Ask the AI assistant with this message"
          >
            AI
          </button>
        )}
        {streaming && (
          <button type="button" className="stop" data-testid="stop" onClick={onStop} aria-label="Stop the answer">
            Stop
          </button>
        )}
        <button type="submit" className="send primary" data-testid="send" disabled={!trimmed || tooLong} aria-label="Send">
          Send
        </button>
      </div>
      <p id="composer-help" className="sr-only">
        Enter sends, Shift+Enter starts a new line, Up edits your last message{streaming ? ", Escape stops the answer" : ""}.
      </p>
    </form>
  );
}
