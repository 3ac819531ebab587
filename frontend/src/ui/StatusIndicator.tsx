import { useEffect, useState } from "react";
import type { ConnectionStatus, StatusDetail } from "../net/connection";

interface Props {
  status: ConnectionStatus;
  detail: StatusDetail;
  queued: number;
}

/** offline / reconnecting / connected, with when the next try is. */
export function StatusIndicator({ status, detail, queued }: Props) {
  const [now, setNow] = useState(() => Date.now());
  const waiting = status === "reconnecting" && detail.retryAt !== null;
  useEffect(() => {
    if (!waiting && detail.pausedUntil === null) return;
    const t = setInterval(() => setNow(Date.now()), 500);
    return () => clearInterval(t);
  }, [waiting, detail.pausedUntil]);

  let extra = "";
  if (waiting && detail.retryAt !== null) {
    const s = Math.max(0, Math.ceil((detail.retryAt - now) / 1000));
    extra = s > 0 ? `retry in ${s}s` : "retrying…";
  } else if (status === "offline") {
    extra = detail.reason === "unauthorized" ? "sign-in needed" : detail.reason === "forbidden" ? "refused by the server" : detail.reason === "network" ? "no network" : "";
  }
  if (detail.pausedUntil !== null && detail.pausedUntil > now) {
    extra = `rate limited ${Math.ceil((detail.pausedUntil - now) / 1000)}s`;
  }
  if (queued > 0) extra = [extra, `${queued} queued`].filter(Boolean).join(" · ");

  return (
    <div className={`status status-${status}`} title={extra || status}>
      <span className="dot" aria-hidden="true" />
      <span data-testid="status" role="status" aria-live="polite">
        {status}
      </span>
      {extra && <span className="status-extra">{extra}</span>}
    </div>
  );
}
