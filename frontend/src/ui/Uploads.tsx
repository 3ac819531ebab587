import { useRef } from "react";
import { jobProgress } from "../net/upload";
import type { UploadTask } from "../hooks/useUploads";
import type { UploadedDocument } from "../protocol";

interface Props {
  tasks: UploadTask[];
  onFiles: (files: File[]) => void;
  onDismiss: (id: string) => void;
}

function phaseText(t: UploadTask): string {
  switch (t.phase) {
    case "uploading":
      return `Uploading… ${Math.round(t.sent * 100)}%`;
    case "processing":
      return t.job ? `${t.job.state === "queued" ? "Queued" : "Indexing"} ${t.job.done}/${t.job.total}` : "Processing…";
    case "done":
      return "Added";
    case "failed":
      return `Failed: ${t.error ?? "unknown error"}`;
  }
}

/** Add documents: a file picker (drag and drop is handled by the whole page) and progress. */
export function Uploads({ tasks, onFiles, onDismiss }: Props) {
  const input = useRef<HTMLInputElement>(null);
  return (
    <div className="uploads">
      <input
        ref={input}
        id="upload-input"
        data-testid="upload-input"
        type="file"
        multiple
        className="sr-only"
        onChange={(e) => {
          const files = Array.from(e.target.files ?? []);
          e.target.value = "";
          onFiles(files);
        }}
      />
      <button type="button" onClick={() => input.current?.click()}>
        Add documents…
      </button>
      <p className="hint">or drop files anywhere on the page</p>
      <div data-testid="upload-status" className="upload-status" aria-live="polite">
        {tasks.map((t) => {
          const progress = t.phase === "uploading" ? t.sent : t.job ? jobProgress(t.job) : t.phase === "done" ? 1 : 0;
          return (
            <div key={t.id} className={`upload upload-${t.phase}`} data-phase={t.phase}>
              <div className="upload-head">
                <span className="upload-names" title={t.names.join(", ")}>
                  {t.names.length === 1 ? t.names[0] : `${t.names.length} files`}
                </span>
                <button type="button" className="icon" onClick={() => onDismiss(t.id)} aria-label={t.phase === "uploading" ? "Cancel upload" : "Dismiss"}>
                  ✕
                </button>
              </div>
              <progress max={1} value={t.phase === "failed" ? 0 : progress} aria-label={`Progress of ${t.names.join(", ")}`} />
              <p className={t.phase === "failed" ? "upload-phase error" : "upload-phase"} role={t.phase === "failed" ? "alert" : undefined}>
                {phaseText(t)}
              </p>
              {t.job && t.job.files.length > 0 && (
                <ul className="upload-files">
                  {t.job.files.map((f) => (
                    <li key={f.name} data-state={f.state}>
                      <span className="mono">{f.name}</span>: {f.state}
                      {typeof f.chunks === "number" ? ` (${f.chunks} chunk${f.chunks === 1 ? "" : "s"})` : ""}
                      {f.error ? <span className="error"> — {f.error}</span> : null}
                    </li>
                  ))}
                </ul>
              )}
            </div>
          );
        })}
      </div>
    </div>
  );
}

interface DocumentsProps {
  documents: UploadedDocument[];
  removing: ReadonlySet<string>;
  error: string | null;
  onRemove: (name: string) => void;
}

function sizeText(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/** The documents this user added: size, whether they are in the index, and a remove button. */
export function YourDocuments({ documents, removing, error, onRemove }: DocumentsProps) {
  if (!documents.length && !error) return null;
  return (
    <div className="your-documents">
      <h3>Your documents</h3>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <ul data-testid="your-documents">
        {documents.map((d) => {
          const busy = removing.has(d.name);
          return (
            <li key={d.name} data-name={d.name}>
              <span className="mono doc-name" title={d.name}>
                {d.name}
              </span>
              <span className="hint">
                {sizeText(d.bytes)} · {d.chunks === null ? "not indexed" : `${d.chunks} chunk${d.chunks === 1 ? "" : "s"}`}
              </span>
              <button type="button" className="icon" disabled={busy} onClick={() => onRemove(d.name)} aria-label={`Remove ${d.name}`} title="Remove from the index">
                {busy ? "…" : "✕"}
              </button>
            </li>
          );
        })}
      </ul>
    </div>
  );
}
