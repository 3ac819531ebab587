import { memo, useCallback, useEffect, useRef, useState, type KeyboardEvent } from "react";
import { citationsInMarkdown } from "../state/citations";
import type { ChatMessage } from "../state/chat";
import { MAX_MESSAGE_CHARS, type Rating, type SourceChunk } from "../protocol";
import { CopyButton } from "./CopyButton";
import { Markdown } from "./Markdown";
import { fileName, sourcePlace, sourceTitle, timeOf } from "./format";

const NONE: readonly number[] = [];

export interface OpenSource {
  messageId: string;
  n: number;
  source: SourceChunk;
  /** Where focus returns when the panel closes. */
  returnTo: HTMLElement | null;
}

interface Props {
  msg: ChatMessage;
  /** In a private conversation the author of user messages is always "You". */
  privateChat: boolean;
  offline: boolean;
  onOpenSource: (s: OpenSource) => void;
  onRetry: (m: ChatMessage) => void;
  /** Given for the one answer that may be asked for again (the latest, of my question). */
  onRegenerate?: (m: ChatMessage) => void;
  /** Given for the one message of mine that may be edited (my latest): sends its new text,
   * false when it could not be sent. */
  onEdit?: (m: ChatMessage, text: string) => boolean;
  /** Changes when the editor of the editable message should open (given to every message). */
  editRequest?: number;
  /** Rate a finished answer (given while online). */
  onRate?: (m: ChatMessage, rating: Rating | null) => void;
}

function statusText(m: ChatMessage, offline: boolean): string | null {
  if (m.failed) return `Not sent (${m.failed})`;
  if (m.pending) return offline ? "Queued — sends when back online" : "Sending…";
  return null;
}

export const MessageView = memo(function MessageView({ msg, privateChat, offline, onOpenSource, onRetry, onRegenerate, onEdit, editRequest = 0, onRate }: Props) {
  // the new text while editing (null: not editing); closed when the message stops being
  // editable (someone wrote after it, an answer started)
  const [draft, setDraft] = useState<string | null>(null);
  const editing = draft !== null && onEdit !== undefined;
  const requested = useRef(editRequest);
  useEffect(() => {
    if (editRequest === requested.current) return;
    requested.current = editRequest;
    if (onEdit) setDraft(msg.text);
  }, [editRequest, onEdit, msg.text]);
  const close = () => {
    setDraft(null);
    document.getElementById("composer")?.focus({ preventScroll: true });
  };
  const save = () => {
    const text = (draft ?? "").trim();
    if (!onEdit || !text) return;
    if (text === msg.text || onEdit(msg, text)) close();
  };
  const onEditKey = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      save();
    } else if (e.key === "Escape") {
      e.preventDefault();
      close();
    }
  };
  const ai = msg.role === "ai";
  const sources = msg.sources ?? [];
  const t = timeOf(msg.ts);
  const label = useCallback(
    (n: number) => {
      const s = sources.find((x) => x.n === n);
      return s ? `Source ${n}: ${sourceTitle(s)}` : `Source ${n}`;
    },
    [sources],
  );
  const open = (n: number, el: HTMLElement | null) => {
    const source = sources.find((s) => s.n === n);
    if (source) onOpenSource({ messageId: msg.id, n, source, returnTo: el });
  };
  // once the answer is done, the server's check decides: only sources that support the
  // sentence citing them count as cited; the others are marked
  const checked = Boolean(msg.citations) && !msg.streaming;
  const cited = new Set(checked ? msg.citations : citationsInMarkdown(msg.text, sources.length));
  const unsupported = msg.unsupported ?? NONE;
  const unsupportedSet = new Set(unsupported);
  const st = statusText(msg, offline);
  const author = ai ? "Assistant" : privateChat ? "You" : msg.mine ? `${msg.user} (you)` : msg.user;

  return (
    <article
      className={`msg ${ai ? "msg-ai" : "msg-user"}${msg.mine ? " mine" : ""}${msg.pending ? " pending" : ""}${editing ? " editing" : ""}`}
      data-testid="message"
      data-role={ai ? "ai" : "user"}
      data-message-id={msg.id}
      aria-label={ai ? "Assistant's answer" : `Message from ${author}`}
    >
      <header className="msg-head">
        <span className="author">{author}</span>
        {ai && (
          <span className="badge badge-ai" title="Written by the AI assistant">
            AI
          </span>
        )}
        {!ai && msg.askedAi && !privateChat && <span className="badge badge-ask">asks AI</span>}
        {t && (
          <time dateTime={t.iso} title={t.full}>
            {t.short}
          </time>
        )}
        {msg.editedAt !== undefined && (
          <span className="edited" title={timeOf(msg.editedAt) ? `Edited ${timeOf(msg.editedAt)!.full}` : "Edited"}>
            (edited)
          </span>
        )}
        {st && <span className={msg.failed ? "msg-status error" : "msg-status"}>{st}</span>}
        {msg.failed && (
          <button type="button" className="link" onClick={() => onRetry(msg)}>
            Retry
          </button>
        )}
        {ai && !msg.streaming && msg.text && <CopyButton text={msg.text} what="the answer" />}
        {ai && onRate && !msg.streaming && msg.text && (
          <span className="rate" role="group" aria-label="Rate this answer">
            {(["up", "down"] as const).map((r) => (
              <button
                key={r}
                type="button"
                className="link rate-button"
                data-testid={`rate-${r}`}
                aria-label={r === "up" ? "Good answer" : "Bad answer"}
                aria-pressed={msg.rating === r ? "true" : "false"}
                title={msg.rating === r ? "Take your rating back" : r === "up" ? "A good answer" : "A bad answer (say what was wrong)"}
                onClick={() => onRate(msg, msg.rating === r ? null : r)}
              >
                <Thumb down={r === "down"} />
              </button>
            ))}
          </span>
        )}
        {onEdit && !editing && (
          <button type="button" className="link edit" data-testid="edit" title={msg.askedAi || privateChat ? "Change this question: it is answered again" : "Change this message"} onClick={() => setDraft(msg.text)}>
            Edit
          </button>
        )}
        {onRegenerate && (
          <button type="button" className="link regenerate" data-testid="regenerate" title="Answer the same question once more (this answer is replaced)" onClick={() => onRegenerate(msg)}>
            Regenerate
          </button>
        )}
      </header>
      {ai ? (
        <div className="answer" aria-live="polite" aria-busy={msg.streaming ? "true" : "false"}>
          {msg.text ? (
            <Markdown text={msg.text} nSources={sources.length} unsupported={unsupported} label={label} onCite={open} className={msg.streaming ? "streaming" : undefined} />
          ) : msg.streaming ? (
            <p className="thinking">{sources.length ? "Writing the answer…" : "Searching your documents…"}</p>
          ) : null}
        </div>
      ) : editing ? (
        <form
          className="edit-form"
          onSubmit={(e) => {
            e.preventDefault();
            save();
          }}
        >
          <textarea
            data-testid="edit-text"
            aria-label="Edit your message"
            value={draft ?? ""}
            maxLength={MAX_MESSAGE_CHARS}
            rows={Math.min(8, Math.max(2, (draft ?? "").split("\n").length))}
            autoFocus
            onChange={(e) => setDraft(e.target.value)}
            onKeyDown={onEditKey}
          />
          <div className="edit-actions">
            <button type="submit" className="primary" data-testid="edit-save" disabled={!(draft ?? "").trim()}>
              {msg.askedAi || privateChat ? "Save and ask again" : "Save"}
            </button>
            <button type="button" className="link" onClick={close}>
              Cancel
            </button>
          </div>
        </form>
      ) : (
        <div className="text">{msg.text}</div>
      )}
      {ai && <ReplyFooter msg={msg} />}
      {ai && sources.length > 0 && (
        <details className="sources" open>
          <summary>
            Sources ({sources.length}){msg.query ? <span className="query"> · searched for “{msg.query}”</span> : null}
          </summary>
          <ol>
            {sources.map((s) => {
              const verdict = sourceVerdict(s.n, cited, unsupportedSet, checked);
              return (
                <li key={s.n} className={verdict ?? undefined} data-verdict={verdict ?? undefined}>
                  <button type="button" className="source-link" onClick={(e) => open(s.n, e.currentTarget)} aria-label={`Open source ${s.n}: ${sourceTitle(s)}${verdict === "unsupported" ? " (does not support the answer)" : ""}`}>
                    <span className="n">[{s.n}]</span> <span className="title">{sourceTitle(s)}</span>
                    {sourcePlace(s) && <span className="place"> — {sourcePlace(s)}</span>}
                    {s.source && fileName(s.source) !== sourceTitle(s) && <span className="file"> · {fileName(s.source)}</span>}
                    {verdict === "unsupported" && <span className="verdict"> · cited, but does not support the answer</span>}
                  </button>
                </li>
              );
            })}
          </ol>
        </details>
      )}
    </article>
  );
});

/** A thumb up (or down): Feather's thumbs-up / thumbs-down icons (MIT), drawn inline so they
 * need no emoji font (headless and minimal systems have none). */
function Thumb({ down }: { down: boolean }) {
  return (
    <svg className="thumb" viewBox="0 0 24 24" width="14" height="14" aria-hidden="true" focusable="false">
      <path
        d={
          down
            ? "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17"
            : "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"
        }
      />
    </svg>
  );
}

/**
 * How a source stands once the answer is checked: "cited" (it supports a sentence citing it),
 * "unsupported" (cited, supports none) or "uncited"; while streaming, only "cited" (from the
 * markers so far).
 */
export function sourceVerdict(n: number, cited: ReadonlySet<number>, unsupported: ReadonlySet<number>, checked: boolean): "cited" | "unsupported" | "uncited" | null {
  if (cited.has(n)) return "cited";
  if (!checked) return null;
  return unsupported.has(n) ? "unsupported" : "uncited";
}

function ReplyFooter({ msg }: { msg: ChatMessage }) {
  if (msg.noMatch) return <p className="reply-note">Nothing in the documents matched this question.</p>;
  if (msg.error) {
    return (
      <p className="reply-note error" role="alert">
        {msg.error.partial ? "The answer broke off: " : "No answer: "}
        {msg.error.message}
      </p>
    );
  }
  if (msg.finishReason === "cancelled") {
    if (msg.cancelReason === "server_shutdown") return <p className="reply-note">Stopped: the server restarted.</p>;
    return <p className="reply-note">Stopped{msg.cancelledBy ? ` by ${msg.cancelledBy}` : ""}.</p>;
  }
  if (msg.finishReason === "length") return <p className="reply-note">The answer reached its length limit.</p>;
  if (msg.streaming && msg.cancelledBy) return <p className="reply-note">Stopping…</p>;
  return null;
}
