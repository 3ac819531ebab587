import { useEffect, useRef } from "react";
import type { OpenSource } from "./MessageView";
import { sourceTitle } from "./format";

interface Props {
  open: OpenSource;
  onClose: () => void;
}

/** The source behind a citation: file, heading or page, and the snippet (all as text). */
export function SourcePanel({ open, onClose }: Props) {
  const closeBtn = useRef<HTMLButtonElement>(null);
  const { source: s, n } = open;

  useEffect(() => {
    closeBtn.current?.focus();
    const onKey = (e: KeyboardEvent) => {
      if (e.key === "Escape") onClose();
    };
    document.addEventListener("keydown", onKey);
    return () => document.removeEventListener("keydown", onKey);
  }, [open, onClose]);

  return (
    <aside className="source-panel" data-testid="source-panel" role="dialog" aria-modal="false" aria-labelledby="source-panel-title">
      <header>
        <h2 id="source-panel-title">
          <span className="n">[{n}]</span> {sourceTitle(s)}
        </h2>
        <button ref={closeBtn} type="button" className="icon" onClick={onClose} aria-label="Close source">
          ✕
        </button>
      </header>
      <dl>
        {s.source && (
          <>
            <dt>File</dt>
            <dd className="mono">{s.source}</dd>
          </>
        )}
        {s.heading && (
          <>
            <dt>Section</dt>
            <dd>{s.heading}</dd>
          </>
        )}
        {s.page !== null && s.page !== undefined && (
          <>
            <dt>Page</dt>
            <dd>{s.page}</dd>
          </>
        )}
        {s.doc_id && s.doc_id !== s.source && (
          <>
            <dt>Document</dt>
            <dd className="mono">{s.doc_id}</dd>
          </>
        )}
        {typeof s.score === "number" && (
          <>
            <dt>Score</dt>
            <dd>{s.score.toFixed(4)}</dd>
          </>
        )}
      </dl>
      <h3 className="sr-only">Snippet</h3>
      <blockquote className="snippet">{s.snippet}</blockquote>
    </aside>
  );
}
