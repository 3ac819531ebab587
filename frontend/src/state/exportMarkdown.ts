/** A conversation or room as a Markdown file a person can keep, share or print. */
import { sourcePlace, sourceTitle } from "../ui/format";
import type { ChatMessage, RoomState } from "./chat";

function stamp(ts: number): string {
  if (!ts || !Number.isFinite(ts)) return "";
  // UTC, to the minute: the same in every reader's time zone
  return new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function author(m: ChatMessage, privateChat: boolean): string {
  if (m.role === "ai") return "Assistant";
  return privateChat ? "You" : m.user || "someone";
}

export function roomTitle(room: RoomState): string {
  return room.kind === "room" ? `#${room.id}` : room.title || "Conversation";
}

/** What was said, in order: each message with its author and time (and whether it was
 * edited), each answer with the
 * sources it was given (file, place) and what became of it if it did not finish. Messages
 * not sent (queued, failed) and join/leave notices are left out. */
export function conversationMarkdown(room: RoomState, now: Date = new Date()): string {
  const privateChat = room.kind === "conversation";
  const out = [`# ${roomTitle(room)}`, "", `_Exported from rag_chat on ${stamp(now.getTime() / 1000)}._`];
  for (const item of room.items) {
    if (item.kind !== "message" || item.pending || item.failed) continue;
    const when = stamp(item.ts);
    const edited = item.editedAt !== undefined ? " · edited" : "";
    out.push("", "---", "", `**${author(item, privateChat)}**${when ? ` · ${when}` : ""}${edited}`, "");
    out.push(item.text.trim() || "_(no text)_");
    if (item.role !== "ai") continue;
    if (item.noMatch) out.push("", "_Nothing in the documents matched this question._");
    if (item.error) out.push("", `_${item.error.partial ? "The answer broke off" : "No answer"}: ${item.error.message}_`);
    else if (item.finishReason === "cancelled") out.push("", "_Stopped._");
    else if (item.finishReason === "length") out.push("", "_The answer reached its length limit._");
    else if (item.streaming) out.push("", "_(still being written when exported)_");
    const sources = item.sources ?? [];
    if (sources.length) {
      out.push("", "Sources:", "");
      for (const s of sources) {
        const place = sourcePlace(s);
        const file = s.source && s.source !== sourceTitle(s) ? ` (${s.source})` : "";
        out.push(`${s.n}. ${sourceTitle(s)}${place ? ` — ${place}` : ""}${file}`);
      }
    }
  }
  return out.join("\n") + "\n";
}

/** "which-port-does-the-server-listen-on-2026-11-28.md" */
export function exportFileName(room: RoomState, now: Date = new Date()): string {
  const slug = roomTitle(room)
    .toLowerCase()
    .normalize("NFKD")
    .replace(/\p{M}+/gu, "") // accents off: "Über" → "uber"
    .replace(/[^\p{L}\p{N}]+/gu, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 60)
    .replace(/-+$/, "");
  return `${slug || "conversation"}-${now.toISOString().slice(0, 10)}.md`;
}

export function hasMessages(room: RoomState): boolean {
  return room.items.some((i) => i.kind === "message" && !i.pending && !i.failed);
}
