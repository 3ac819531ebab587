/**
 * What the browser remembers (localStorage): recent rooms, the display name, the theme and
 * the private conversations started here. Storage is injectable; every read tolerates junk.
 */
import { ROOM_ID_PATTERN } from "../protocol";

export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

const KEYS = {
  rooms: "rag_chat.recentRooms",
  name: "rag_chat.name",
  theme: "rag_chat.theme",
  conversations: "rag_chat.conversations",
} as const;

export const MAX_RECENT_ROOMS = 8;
export const MAX_LOCAL_CONVERSATIONS = 50;

export type Theme = "light" | "dark";

export interface LocalConversation {
  id: string;
  title: string | null;
  updated_at: number;
}

function safeStorage(): StorageLike | null {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null;
  }
}

function readJson(s: StorageLike | null, key: string): unknown {
  if (!s) return null;
  try {
    const raw = s.getItem(key);
    return raw === null ? null : (JSON.parse(raw) as unknown);
  } catch {
    return null;
  }
}

function write(s: StorageLike | null, key: string, value: string | null): void {
  if (!s) return;
  try {
    if (value === null) s.removeItem(key);
    else s.setItem(key, value);
  } catch {
    /* full or disabled */
  }
}

export function createStore(storage: StorageLike | null = safeStorage()) {
  return {
    recentRooms(): string[] {
      const v = readJson(storage, KEYS.rooms);
      return Array.isArray(v) ? v.filter((r): r is string => typeof r === "string" && ROOM_ID_PATTERN.test(r)).slice(0, MAX_RECENT_ROOMS) : [];
    },
    /** Most recent first, unique, bounded. */
    addRecentRoom(room: string): string[] {
      const rooms = [room, ...this.recentRooms().filter((r) => r !== room)].slice(0, MAX_RECENT_ROOMS);
      write(storage, KEYS.rooms, JSON.stringify(rooms));
      return rooms;
    },
    removeRecentRoom(room: string): string[] {
      const rooms = this.recentRooms().filter((r) => r !== room);
      write(storage, KEYS.rooms, JSON.stringify(rooms));
      return rooms;
    },
    name(): string {
      const v = storage?.getItem(KEYS.name);
      return typeof v === "string" ? v.slice(0, 64) : "";
    },
    setName(name: string): void {
      write(storage, KEYS.name, name.trim() ? name.trim().slice(0, 64) : null);
    },
    theme(): Theme | null {
      const v = storage?.getItem(KEYS.theme);
      return v === "light" || v === "dark" ? v : null;
    },
    setTheme(theme: Theme | null): void {
      write(storage, KEYS.theme, theme);
    },
    localConversations(): LocalConversation[] {
      const v = readJson(storage, KEYS.conversations);
      if (!Array.isArray(v)) return [];
      return v
        .filter((c): c is LocalConversation => Boolean(c) && typeof (c as LocalConversation).id === "string" && ROOM_ID_PATTERN.test((c as LocalConversation).id))
        .map((c) => ({ id: c.id, title: typeof c.title === "string" ? c.title : null, updated_at: typeof c.updated_at === "number" ? c.updated_at : 0 }));
    },
    /** Remember a conversation started here (newest first). */
    touchConversation(id: string, title: string | null, now: number): LocalConversation[] {
      const old = this.localConversations();
      const prev = old.find((c) => c.id === id);
      const entry = { id, title: title ?? prev?.title ?? null, updated_at: now };
      const list = [entry, ...old.filter((c) => c.id !== id)].slice(0, MAX_LOCAL_CONVERSATIONS);
      write(storage, KEYS.conversations, JSON.stringify(list));
      return list;
    },
    renameConversation(id: string, title: string): LocalConversation[] {
      const list = this.localConversations().map((c) => (c.id === id ? { ...c, title } : c));
      write(storage, KEYS.conversations, JSON.stringify(list));
      return list;
    },
    forgetConversation(id: string): LocalConversation[] {
      const list = this.localConversations().filter((c) => c.id !== id);
      write(storage, KEYS.conversations, JSON.stringify(list));
      return list;
    },
  };
}

export type Store = ReturnType<typeof createStore>;
