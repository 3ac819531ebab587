import { memo, useCallback } from "react";
import { citationsInMarkdown } from "../state/citations";
import type { ChatMessage } from "../state/chat";
import type { SourceChunk } from "../protocol";
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
}

function statusText(m: ChatMessage, offline: boolean): string | null {
  if (m.failed) return `Not sent (${m.failed})`;
  if (m.pending) return offline ? "Queued — sends when back online" : "Sending…";
  return null;
}

export const MessageView = memo(function MessageView({ msg, privateChat, offline, onOpenSource, onRetry }: Props) {
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
  const cited = new Set(msg.citations && !msg.streaming ? msg.citations : citationsInMarkdown(msg.text, sources.length));
  const unsupported = msg.unsupported ?? NONE;
  const st = statusText(msg, offline);
  const author = ai ? "Assistant" : privateChat ? "You" : msg.mine ? `${msg.user} (you)` : msg.user;

  return (
    <article
      className={`msg ${ai ? "msg-ai" : "msg-user"}${msg.mine ? " mine" : ""}${msg.pending ? " pending" : ""}`}
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
        {st && <span className={msg.failed ? "msg-status error" : "msg-status"}>{st}</span>}
        {msg.failed && (
          <button type="button" className="link" onClick={() => onRetry(msg)}>
            Retry
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
            {sources.map((s) => (
              <li key={s.n} className={cited.has(s.n) ? "cited" : undefined}>
                <button type="button" className="source-link" onClick={(e) => open(s.n, e.currentTarget)} aria-label={`Open source ${s.n}: ${sourceTitle(s)}`}>
                  <span className="n">[{s.n}]</span> <span className="title">{sourceTitle(s)}</span>
                  {sourcePlace(s) && <span className="place"> — {sourcePlace(s)}</span>}
                  {s.source && fileName(s.source) !== sourceTitle(s) && <span className="file"> · {fileName(s.source)}</span>}
                </button>
              </li>
            ))}
          </ol>
        </details>
      )}
    </article>
  );
});

function ReplyFooter({ msg }: { msg: ChatMessage }) {
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
