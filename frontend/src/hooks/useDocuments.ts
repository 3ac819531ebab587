/** The caller's uploaded documents: listed, refreshed when an upload ends, removable. */
import { useCallback, useEffect, useRef, useState } from "react";
import { ApiError, type Api } from "../net/api";
import { describeUploadError, pollJob } from "../net/upload";
import type { UploadedDocument } from "../protocol";

/** `enabled`: signed in (or open); `version`: changes when an upload ends, to list again. */
export function useDocuments(api: Api, enabled: boolean, version: number) {
  const [documents, setDocuments] = useState<UploadedDocument[]>([]);
  const [removing, setRemoving] = useState<ReadonlySet<string>>(new Set());
  const [error, setError] = useState<string | null>(null);
  const live = useRef({ aborted: false });

  useEffect(() => {
    const signal = live.current;
    signal.aborted = false;
    return () => {
      signal.aborted = true;
    };
  }, []);

  const refresh = useCallback(async () => {
    try {
      const list = await api.documents();
      if (!live.current.aborted) setDocuments(list.documents);
    } catch (e) {
      // signed out, or a server without the listing: nothing to show, nothing to complain of
      if (e instanceof ApiError && [401, 403, 404, 405].includes(e.status)) setDocuments([]);
      else if (!live.current.aborted) setError(describeUploadError(e));
    }
  }, [api]);

  useEffect(() => {
    if (enabled) void refresh();
    else setDocuments([]);
  }, [refresh, enabled, version]);

  const remove = useCallback(
    async (name: string) => {
      setError(null);
      setRemoving((r) => new Set(r).add(name));
      try {
        const accepted = await api.removeDocument(name);
        const job = await pollJob(accepted.job_id, { fetchJob: api.job, onUpdate: () => {}, signal: live.current });
        if (job.state !== "done") setError(job.message ?? `${name} could not be removed`);
      } catch (e) {
        if (live.current.aborted) return;
        // a 404 here is the document, not the feature: gone already, or never the caller's
        setError(e instanceof ApiError && e.status === 404 ? `${name}: ${e.message}` : describeUploadError(e));
      } finally {
        setRemoving((r) => {
          const next = new Set(r);
          next.delete(name);
          return next;
        });
        await refresh();
      }
    },
    [api, refresh],
  );

  return { documents, removing, error, remove, refresh };
}
