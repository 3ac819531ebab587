import { describe, expect, it } from "vitest";
import type { ChatMessage, RoomState, TimelineItem } from "../src/state/chat";
import { conversationMarkdown, exportFileName, hasMessages } from "../src/state/exportMarkdown";

const TS = Date.UTC(2026, 10, 28, 6, 0) / 1000;
const NOW = new Date(Date.UTC(2026, 10, 28, 7, 30));

function room(kind: "room" | "conversation", items: TimelineItem[], title: string | null = null): RoomState {
  return { id: "team", kind, title, joined: true, me: "ann", members: [], items, typing: {}, unread: 0 };
}

const msg = (m: Partial<ChatMessage>): ChatMessage => ({ kind: "message", id: "x", role: "user", user: "ann", text: "", ts: TS, ...m });
const source = { n: 1, id: "c1", doc_id: "faq", source: "data/guide/faq.rst", title: "rag_chat: frequently asked", heading: "Which port?", page: null, snippet: "8000", score: 0.9 };

describe("conversationMarkdown", () => {
  it("writes each message with its author and time, and each answer with its sources", () => {
    const md = conversationMarkdown(
      room(
        "conversation",
        [
          msg({ id: "q", text: "Which port does the server listen on?" }),
          msg({ id: "a", role: "ai", user: "assistant", text: "Port 8000 [1].", sources: [source], finishReason: "stop" }),
          msg({ id: "local:1", text: "queued, not sent", pending: true }),
          msg({ id: "local:2", text: "refused", failed: "rate_limited" }),
          { kind: "notice", id: "n", text: "bob joined", ts: TS } as TimelineItem,
        ],
        "Which port?",
      ),
      NOW,
    );
    expect(md).toBe(
      [
        "# Which port?",
        "",
        "_Exported from rag_chat on 2026-11-28 07:30 UTC._",
        "",
        "---",
        "",
        "**You** · 2026-11-28 06:00 UTC",
        "",
        "Which port does the server listen on?",
        "",
        "---",
        "",
        "**Assistant** · 2026-11-28 06:00 UTC",
        "",
        "Port 8000 [1].",
        "",
        "Sources:",
        "",
        "1. rag_chat: frequently asked — Which port? (data/guide/faq.rst)",
        "",
      ].join("\n"),
    );
  });

  it("names people in rooms, marks an edited message and says how an answer ended when it did not finish", () => {
    const md = conversationMarkdown(
      room("room", [
        msg({ user: "bob", text: "@ai what is it?", editedAt: TS + 60 }),
        msg({ role: "ai", text: "It is", finishReason: "error", error: { code: "llm_error", message: "the model stopped", partial: true } }),
        msg({ role: "ai", text: "Half", finishReason: "cancelled" }),
        msg({ role: "ai", text: "Nothing found.", noMatch: true }),
        msg({ role: "ai", text: "Still", streaming: true }),
      ]),
      NOW,
    );
    expect(md.startsWith("# #team\n")).toBe(true);
    expect(md).toContain("**bob** · 2026-11-28 06:00 UTC · edited\n\n@ai what is it?");
    expect(md).toContain("It is\n\n_The answer broke off: the model stopped_");
    expect(md).toContain("Half\n\n_Stopped._");
    expect(md).toContain("Nothing found.\n\n_Nothing in the documents matched this question._");
    expect(md).toContain("Still\n\n_(still being written when exported)_");
    expect(md).not.toContain("Sources:");
  });
});

describe("exportFileName / hasMessages", () => {
  it("makes a safe file name from the title and the date", () => {
    expect(exportFileName(room("conversation", [], "Which port does the server listen on?"), NOW)).toBe("which-port-does-the-server-listen-on-2026-11-28.md");
    expect(exportFileName(room("conversation", [], "../../etc/passwd ☃"), NOW)).toBe("etc-passwd-2026-11-28.md");
    expect(exportFileName(room("conversation", [], "Über Größe"), NOW)).toBe("uber-große-2026-11-28.md");
    expect(exportFileName(room("conversation", [], "???"), NOW)).toBe("conversation-2026-11-28.md");
    expect(exportFileName(room("room", []), NOW)).toBe("team-2026-11-28.md");
  });

  it("offers an export only when something was said", () => {
    expect(hasMessages(room("conversation", []))).toBe(false);
    expect(hasMessages(room("conversation", [msg({ pending: true })]))).toBe(false);
    expect(hasMessages(room("conversation", [msg({})]))).toBe(true);
  });
});
