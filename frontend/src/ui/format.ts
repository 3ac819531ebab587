/** Display helpers. */
import type { SourceChunk } from "../protocol";

export function timeOf(ts: number): { short: string; iso: string; full: string } | null {
  if (!ts || !Number.isFinite(ts)) return null;
  const d = new Date(ts * 1000);
  return {
    short: d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
    iso: d.toISOString(),
    full: d.toLocaleString(),
  };
}

/** Unix seconds or an ISO string → a short date label. */
export function dateLabel(v: number | string | null | undefined): string {
  if (v === null || v === undefined || v === "") return "";
  const d = typeof v === "number" ? new Date(v * 1000) : new Date(v);
  if (Number.isNaN(d.getTime())) return "";
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString([], { month: "short", day: "numeric" });
}

export function fileName(path: string | null | undefined): string {
  if (!path) return "";
  const parts = path.split(/[\\/]/);
  return parts[parts.length - 1] || path;
}

export function sourceTitle(s: SourceChunk): string {
  return s.title || fileName(s.source) || s.doc_id || `Source ${s.n}`;
}

/** "Heading > Sub" or "page 4". */
export function sourcePlace(s: SourceChunk): string {
  if (s.heading) return s.heading;
  if (s.page !== null && s.page !== undefined) return `page ${s.page}`;
  return "";
}

/** Does a conversation's title hold every word of the filter (any order, any case, accents
 * ignored)? An empty filter matches everything. */
export function matchesFilter(title: string | null | undefined, filter: string): boolean {
  const fold = (t: string) => t.normalize("NFKD").replace(/\p{M}+/gu, "").toLocaleLowerCase();
  const words = fold(filter).split(/\s+/).filter(Boolean);
  if (!words.length) return true;
  const hay = fold(title ?? "");
  return words.every((w) => hay.includes(w));
}

/** From this many conversations on, the list offers a filter. */
export const FILTER_FROM = 6;
