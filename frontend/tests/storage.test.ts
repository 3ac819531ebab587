import { describe, expect, it } from "vitest";
import { createStore, MAX_RECENT_ROOMS, type StorageLike } from "../src/state/storage";

function memory(): StorageLike & { data: Map<string, string> } {
  const data = new Map<string, string>();
  return { data, getItem: (k) => data.get(k) ?? null, setItem: (k, v) => void data.set(k, v), removeItem: (k) => void data.delete(k) };
}

describe("store", () => {
  it("keeps recent rooms, most recent first, unique and bounded", () => {
    const s = createStore(memory());
    s.addRecentRoom("a");
    s.addRecentRoom("b");
    expect(s.addRecentRoom("a")).toEqual(["a", "b"]);
    for (let i = 0; i < 20; i++) s.addRecentRoom(`r${i}`);
    expect(s.recentRooms()).toHaveLength(MAX_RECENT_ROOMS);
    expect(s.recentRooms()[0]).toBe("r19");
    expect(s.removeRecentRoom("r19")[0]).toBe("r18");
  });
  it("tolerates junk in storage and no storage at all", () => {
    const m = memory();
    m.setItem("rag_chat.recentRooms", "{not json");
    m.setItem("rag_chat.conversations", JSON.stringify([{ id: "bad id!" }, { id: "ok", title: 3 }, null]));
    m.setItem("rag_chat.theme", "purple");
    const s = createStore(m);
    expect(s.recentRooms()).toEqual([]);
    expect(s.localConversations()).toEqual([{ id: "ok", title: null, updated_at: 0 }]);
    expect(s.theme()).toBeNull();
    const none = createStore(null);
    expect(none.recentRooms()).toEqual([]);
    none.addRecentRoom("x");
    none.setTheme("dark");
  });
  it("remembers name, theme and conversations", () => {
    const s = createStore(memory());
    s.setName("  alice ");
    expect(s.name()).toBe("alice");
    s.setTheme("dark");
    expect(s.theme()).toBe("dark");
    s.touchConversation("c1", "first", 1);
    s.touchConversation("c2", null, 2);
    expect(s.touchConversation("c1", null, 3).map((c) => [c.id, c.title])).toEqual([["c1", "first"], ["c2", null]]);
    expect(s.renameConversation("c2", "named").map((c) => [c.id, c.title])).toEqual([["c1", "first"], ["c2", "named"]]);
    expect(s.forgetConversation("c1").map((c) => [c.id, c.title])).toEqual([["c2", "named"]]);
  });
});
