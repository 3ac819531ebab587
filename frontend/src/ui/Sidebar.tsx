import { useState, type FormEvent } from "react";
import { ROOM_ID_PATTERN, type MemberInfo } from "../protocol";
import type { ChatState } from "../state/chat";
import { dateLabel, FILTER_FROM, matchesFilter } from "./format";

export interface ConversationItem {
  id: string;
  title: string | null;
  updated_at: number | string | null;
}

interface Props {
  state: ChatState;
  recentRooms: string[];
  conversations: ConversationItem[];
  conversationsError: string | null;
  showName: boolean;
  name: string;
  onName: (name: string) => void;
  onJoin: (room: string) => void;
  onLeave: (room: string) => void;
  onSelect: (room: string) => void;
  onNewChat: () => void;
  onOpenConversation: (c: ConversationItem) => void;
  onDeleteConversation: (id: string) => void;
  onRenameConversation: (id: string) => void;
  /** Set when the server has older conversations than those listed. */
  onLoadOlderConversations?: () => void;
  onForgetRecent: (room: string) => void;
  children?: React.ReactNode;
}

export function Sidebar(p: Props) {
  const [room, setRoom] = useState("");
  const [roomError, setRoomError] = useState<string | null>(null);
  const [filter, setFilter] = useState("");
  const shown = p.conversations.filter((c) => matchesFilter(c.title || "Untitled conversation", filter));
  const active = p.state.active ? p.state.rooms[p.state.active] : undefined;
  const joinedRooms = p.state.order.map((id) => p.state.rooms[id]!).filter((r) => r.kind === "room");
  const openConversations = new Set(p.state.order.filter((id) => p.state.rooms[id]!.kind === "conversation"));

  const submit = (e: FormEvent) => {
    e.preventDefault();
    const name = room.trim();
    if (!name) return;
    if (!ROOM_ID_PATTERN.test(name)) {
      setRoomError("Use 1-128 letters, digits, or _ . : -");
      return;
    }
    setRoomError(null);
    setRoom("");
    p.onJoin(name);
  };

  return (
    <nav className="sidebar-inner" aria-label="Rooms and conversations">
      <section aria-labelledby="conv-h">
        <div className="section-head">
          <h2 id="conv-h">Conversations</h2>
          <button type="button" className="small primary" onClick={p.onNewChat}>
            New chat
          </button>
        </div>
        {p.conversationsError && <p className="hint">{p.conversationsError}</p>}
        {p.conversations.length >= FILTER_FROM && (
          <input type="search" className="conv-filter" value={filter} onChange={(e) => setFilter(e.target.value)} placeholder="Filter conversations" aria-label="Filter conversations by title" data-testid="conversation-filter" />
        )}
        <ul className="list">
          {shown.map((c) => {
            const isActive = p.state.active === c.id;
            const unread = p.state.rooms[c.id]?.unread ?? 0;
            return (
              <li key={c.id} className={isActive ? "active" : undefined}>
                <button type="button" className="item" aria-current={isActive ? "page" : undefined} onClick={() => (openConversations.has(c.id) ? p.onSelect(c.id) : p.onOpenConversation(c))}>
                  <span className="item-title">{c.title || "Untitled conversation"}</span>
                  <span className="item-meta">{dateLabel(c.updated_at)}</span>
                  {unread > 0 && <span className="unread" aria-label={`${unread} new`}>{unread}</span>}
                </button>
                <button type="button" className="icon rename" onClick={() => p.onRenameConversation(c.id)} aria-label={`Rename conversation ${c.title || c.id}`} title="Rename" data-testid="rename-conversation">
                  ✎
                </button>
                <button type="button" className="icon" onClick={() => p.onDeleteConversation(c.id)} aria-label={`Delete conversation ${c.title || c.id}`} title="Delete">
                  ✕
                </button>
              </li>
            );
          })}
          {p.conversations.length === 0 && <li className="hint">No conversations yet.</li>}
          {p.conversations.length > 0 && shown.length === 0 && <li className="hint">No conversation titles match “{filter.trim()}”.</li>}
        </ul>
        {p.onLoadOlderConversations && (
          <button type="button" className="link older" onClick={p.onLoadOlderConversations} data-testid="older-conversations">
            Show older conversations
          </button>
        )}
      </section>

      <section aria-labelledby="rooms-h">
        <h2 id="rooms-h">Rooms</h2>
        <form className="room-form" onSubmit={submit}>
          <label htmlFor="room-input" className="sr-only">
            Room name
          </label>
          <input
            id="room-input"
            data-testid="room-input"
            value={room}
            onChange={(e) => setRoom(e.target.value)}
            placeholder="room name"
            autoComplete="off"
            maxLength={128}
            aria-invalid={roomError ? true : undefined}
            aria-describedby={roomError ? "room-error" : undefined}
          />
          <button type="submit" data-testid="room-join">
            Join
          </button>
        </form>
        {roomError && (
          <p id="room-error" className="error small-text" role="alert">
            {roomError}
          </p>
        )}
        <ul className="list">
          {joinedRooms.map((r) => {
            const isActive = p.state.active === r.id;
            return (
              <li key={r.id} className={isActive ? "active" : undefined}>
                <button type="button" className="item" aria-current={isActive ? "page" : undefined} onClick={() => p.onSelect(r.id)}>
                  <span className="item-title">#{r.id}</span>
                  {!r.joined && <span className="item-meta">joining…</span>}
                  {r.unread > 0 && <span className="unread" aria-label={`${r.unread} new`}>{r.unread}</span>}
                </button>
                <button type="button" className="icon" onClick={() => p.onLeave(r.id)} aria-label={`Leave room ${r.id}`}>
                  ✕
                </button>
              </li>
            );
          })}
        </ul>
        {p.recentRooms.filter((r) => !p.state.rooms[r]).length > 0 && (
          <div className="recent">
            <h3>Recent</h3>
            <ul className="chips">
              {p.recentRooms
                .filter((r) => !p.state.rooms[r])
                .map((r) => (
                  <li key={r}>
                    <button type="button" className="chip" onClick={() => p.onJoin(r)} aria-label={`Join room ${r}`}>
                      #{r}
                    </button>
                    <button type="button" className="chip-x" onClick={() => p.onForgetRecent(r)} aria-label={`Forget room ${r}`}>
                      ×
                    </button>
                  </li>
                ))}
            </ul>
          </div>
        )}
      </section>

      {active?.kind === "room" && (
        <section aria-labelledby="members-h">
          <h2 id="members-h">
            Members <span className="count">({active.members.length})</span>
          </h2>
          <Members members={active.members} me={active.me} />
        </section>
      )}

      {p.children}

      {p.showName && (
        <section aria-labelledby="name-h">
          <h2 id="name-h">Your name</h2>
          <label htmlFor="display-name" className="sr-only">
            Display name in rooms
          </label>
          <input id="display-name" value={p.name} maxLength={64} onChange={(e) => p.onName(e.target.value)} placeholder="display name (for rooms)" autoComplete="nickname" />
          <p className="hint">Used when you next join a room (or reconnect).</p>
        </section>
      )}
    </nav>
  );
}

function Members({ members, me }: { members: MemberInfo[]; me: string | null }) {
  return (
    <ul className="members" data-testid="members" aria-label="Members in this room">
      {members.map((m) => (
        <li key={m.user}>
          <span className="presence-dot" aria-hidden="true" />
          {m.user}
          {m.user === me ? " (you)" : ""}
          {m.connections > 1 ? <span className="hint"> ×{m.connections}</span> : null}
        </li>
      ))}
    </ul>
  );
}
