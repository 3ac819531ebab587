/** Uploads in this page: progress of the POST, then the ingest job's progress per file. */
import { useCallback, useEffect, useRef, useState } from "react";
import type { Api } from "../net/api";
import { describeUploadError, pollJob, uploadFiles } from "../net/upload";
import type { IngestJob } from "../protocol";
import { randomHex } from "../net/ids";

export interface UploadTask {
  id: string;
  names: string[];
  phase: "uploading" | "processing" | "done" | "failed";
  /** Upload progress 0..1. */
  sent: number;
  job: IngestJob | null;
  error: string | null;
}

export function useUploads(api: Api) {
  const [tasks, setTasks] = useState<UploadTask[]>([]);
  const live = useRef(new Map<string, { abort: () => void }>());

  useEffect(() => {
    const running = live.current;
    return () => {
      for (const h of running.values()) h.abort();
      running.clear();
    };
  }, []);

  const update = useCallback((id: string, patch: Partial<UploadTask>) => {
    setTasks((ts) => ts.map((t) => (t.id === id ? { ...t, ...patch } : t)));
  }, []);

  const add = useCallback(
    (files: File[]) => {
      if (!files.length) return;
      const id = randomHex(6);
      const task: UploadTask = { id, names: files.map((f) => f.name), phase: "uploading", sent: 0, job: null, error: null };
      setTasks((ts) => [task, ...ts]);
      const signal = { aborted: false };
      const upload = uploadFiles(files, (loaded, total) => update(id, { sent: total ? loaded / total : 0 }));
      live.current.set(id, {
        abort: () => {
          signal.aborted = true;
          upload.abort();
        },
      });
      void (async () => {
        try {
          const accepted = await upload.promise;
          update(id, { phase: "processing", sent: 1, names: accepted.files?.length ? accepted.files : task.names });
          const job = await pollJob(accepted.job_id, { fetchJob: api.job, onUpdate: (j) => update(id, { job: j }), signal });
          update(id, { phase: job.state === "done" ? "done" : "failed", job, error: job.state === "failed" ? (job.message ?? "ingest failed") : null });
        } catch (e) {
          if (!signal.aborted) update(id, { phase: "failed", error: describeUploadError(e) });
        } finally {
          live.current.delete(id);
        }
      })();
    },
    [api, update],
  );

  const dismiss = useCallback((id: string) => {
    live.current.get(id)?.abort();
    live.current.delete(id);
    setTasks((ts) => ts.filter((t) => t.id !== id));
  }, []);

  return { tasks, add, dismiss };
}
