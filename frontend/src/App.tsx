import { useCallback, useEffect, useMemo, useRef, useState, type DragEvent } from "react";
import { ApiError, createApi } from "./net/api";
import { useChat } from "./hooks/useChat";
import { useTheme } from "./hooks/useTheme";
import { useDocuments } from "./hooks/useDocuments";
import { useUploads } from "./hooks/useUploads";
import { editable, streamingReplies, typingLine, typingUsers, type ChatMessage } from "./state/chat";
import { conversationMarkdown, exportFileName, hasMessages } from "./state/exportMarkdown";
import { createStore } from "./state/storage";
import { Composer } from "./ui/Composer";
import type { OpenSource } from "./ui/MessageView";
import type { Rating } from "./protocol";
import { Sidebar, type ConversationItem } from "./ui/Sidebar";
import { SignIn } from "./ui/SignIn";
import { SourcePanel } from "./ui/SourcePanel";
import { downloadText } from "./ui/download";
import { StatusIndicator } from "./ui/StatusIndicator";
import { Timeline } from "./ui/Timeline";
import { Uploads, YourDocuments } from "./ui/Uploads";

type AuthState =
  | { phase: "checking" }
  | { phase: "ready"; mode: "open" | "jwt"; user: string | null }
  | { phase: "signin"; mode: "jwt" };

export function App() {
  const store = useMemo(() => createStore(), []);
  const api = useMemo(() => createApi(), []);
  const [auth, setAuth] = useState<AuthState>({ phase: "checking" });
  const [name, setName] = useState(() => store.name());
  const [recentRooms, setRecentRooms] = useState(() => store.recentRooms());
  const [drawer, setDrawer] = useState(false);
  const [source, setSource] = useState<OpenSource | null>(null);
  const [dragging, setDragging] = useState(false);
  const { theme, toggle } = useTheme(store);
  const uploads = useUploads(api);
  // the uploads that ended (and the sign-in state): the documents list is read again then
  const uploadsEnded = uploads.tasks.filter((t) => t.phase === "done" || t.phase === "failed").length;
  const docs = useDocuments(api, auth.phase === "ready", uploadsEnded);

  // --- auth ---
  useEffect(() => {
    let live = true;
    api
      .auth()
      .then((a) => {
        if (!live) return;
        setAuth(a.mode === "jwt" && !a.user ? { phase: "signin", mode: "jwt" } : { phase: "ready", mode: a.mode, user: a.user });
      })
      // the server is not reachable yet: go on, the connection shows its status and retries
      .catch(() => live && setAuth({ phase: "ready", mode: "open", user: null }));
    return () => {
      live = false;
    };
  }, [api]);

  const onAuthRequired = useCallback(() => setAuth({ phase: "signin", mode: "jwt" }), []);
  const chat = useChat({ enabled: auth.phase === "ready", name, onAuthRequired });
  const { state, status, detail, actions } = chat;
  const authUser = auth.phase === "ready" ? auth.user : null;
  useEffect(() => actions.setMe(authUser ?? (name.trim() || null)), [authUser, name, actions]);

  // a clean page for whoever signs in next: nothing of this user's rooms or answers stays
  const signOut = async () => {
    try {
      await api.signOut();
    } finally {
      window.location.reload();
    }
  };

  // --- conversations ---
  const [serverConversations, setServerConversations] = useState<ConversationItem[] | null>(null);
  const [conversationsError, setConversationsError] = useState<string | null>(null);
  const [localConversations, setLocalConversations] = useState(() => store.localConversations());
  // pages past the first, loaded on request ("Show older"), and the cursor for the next one
  const [olderConversations, setOlderConversations] = useState<ConversationItem[]>([]);
  const [nextBefore, setNextBefore] = useState<number | null>(null);
  const olderLoaded = useRef(false);

  const refreshConversations = useCallback(() => {
    api
      .conversations()
      .then((r) => {
        setServerConversations(r.conversations ?? []);
        if (!olderLoaded.current) setNextBefore(r.next_before ?? null);
        setConversationsError(null);
      })
      .catch((e: unknown) => {
        setServerConversations(null);
        // an older server without the endpoint: the ones started in this browser
        setConversationsError(e instanceof ApiError && e.status === 404 ? null : "Could not load past conversations.");
      });
  }, [api]);

  const loadOlderConversations = useCallback(() => {
    if (nextBefore === null) return;
    api
      .conversations({ before: nextBefore })
      .then((r) => {
        olderLoaded.current = true;
        setOlderConversations((old) => {
          const have = new Set(old.map((c) => c.id));
          return [...old, ...(r.conversations ?? []).filter((c) => !have.has(c.id))];
        });
        setNextBefore(r.next_before ?? null);
      })
      .catch(() => setConversationsError("Could not load older conversations."));
  }, [api, nextBefore]);

  // the conversations that got a finished answer: refresh the list when that changes
  const finished = useMemo(() => {
    let n = 0;
    for (const id of state.order) {
      const r = state.rooms[id]!;
      if (r.kind !== "conversation") continue;
      for (const it of r.items) if (it.kind === "message" && it.role === "ai" && !it.streaming) n++;
    }
    return n;
  }, [state]);
  useEffect(() => {
    if (auth.phase === "ready") refreshConversations();
  }, [auth.phase, finished, refreshConversations]);

  // remember conversations started here (a fallback list, and titles)
  const touched = useRef(new Set<string>());
  useEffect(() => {
    for (const id of state.order) {
      const r = state.rooms[id]!;
      if (r.kind !== "conversation" || !r.items.length || touched.current.has(id)) continue;
      touched.current.add(id);
      setLocalConversations(store.touchConversation(id, r.title, Date.now() / 1000));
    }
  }, [state, store]);

  const conversations = useMemo<ConversationItem[]>(() => {
    const out: ConversationItem[] = [...(serverConversations ?? localConversations)];
    const have = new Set(out.map((c) => c.id));
    for (const c of serverConversations ? olderConversations : []) {
      if (!have.has(c.id)) {
        out.push(c);
        have.add(c.id);
      }
    }
    for (const id of state.order) {
      const r = state.rooms[id]!;
      if (r.kind !== "conversation" || have.has(id) || !r.items.length) continue;
      const last = r.items[r.items.length - 1]!;
      out.unshift({ id, title: r.title, updated_at: last.ts });
      have.add(id);
    }
    return out.map((c) => (!c.title && state.rooms[c.id]?.title ? { ...c, title: state.rooms[c.id]!.title } : c));
  }, [serverConversations, olderConversations, localConversations, state]);

  const deleteConversation = async (id: string) => {
    const c = conversations.find((x) => x.id === id);
    if (!window.confirm(`Delete “${c?.title || "this conversation"}”? Its history is removed from the server.`)) return;
    try {
      await api.deleteConversation(id);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) {
        window.alert(`Could not delete: ${e instanceof Error ? e.message : String(e)}`);
        return;
      }
    }
    setLocalConversations(store.forgetConversation(id));
    setServerConversations((list) => (list ? list.filter((x) => x.id !== id) : list));
    setOlderConversations((list) => list.filter((x) => x.id !== id));
    if (state.rooms[id]) {
      actions.closeConversation(id);
      if (state.active === id) actions.newConversation();
    }
  };

  const renameConversation = async (id: string) => {
    const c = conversations.find((x) => x.id === id);
    const typed = window.prompt("Rename this conversation", c?.title ?? "");
    if (typed === null || !typed.trim() || typed.trim() === c?.title) return;
    let title: string;
    try {
      title = (await api.renameConversation(id, typed)).title;
    } catch (e) {
      window.alert(`Could not rename: ${e instanceof Error ? e.message : String(e)}`);
      return;
    }
    setLocalConversations(store.renameConversation(id, title));
    setServerConversations((list) => (list ? list.map((x) => (x.id === id ? { ...x, title } : x)) : list));
    setOlderConversations((list) => list.map((x) => (x.id === id ? { ...x, title } : x)));
    actions.renamed(id, title);
  };

  // --- rooms ---
  const join = (room: string) => {
    setRecentRooms(store.addRecentRoom(room));
    if (state.rooms[room]) actions.select(room);
    else actions.joinRoom(room);
    setDrawer(false);
  };

  // --- drag and drop anywhere ---
  const dragDepth = useRef(0);
  const hasFiles = (e: DragEvent) => Array.from(e.dataTransfer?.types ?? []).includes("Files");
  const dropProps = {
    onDragEnter: (e: DragEvent) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      dragDepth.current++;
      setDragging(true);
    },
    onDragOver: (e: DragEvent) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
    },
    onDragLeave: (e: DragEvent) => {
      if (!hasFiles(e)) return;
      dragDepth.current = Math.max(0, dragDepth.current - 1);
      if (dragDepth.current === 0) setDragging(false);
    },
    onDrop: (e: DragEvent) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      dragDepth.current = 0;
      setDragging(false);
      uploads.add(Array.from(e.dataTransfer.files));
    },
  };

  // --- sources ---
  const closeSource = useCallback(() => {
    setSource((s) => {
      if (s?.returnTo && document.contains(s.returnTo)) s.returnTo.focus();
      return null;
    });
  }, []);

  const onRetry = useCallback((m: ChatMessage) => state.active && actions.retry(state.active, m), [state.active, actions]);
  const onRegenerate = useCallback((m: ChatMessage) => state.active && actions.regenerate(state.active, m.id), [state.active, actions]);
  const onEdit = useCallback((m: ChatMessage, text: string) => Boolean(state.active) && actions.edit(state.active!, m.id, text, Boolean(m.askedAi)), [state.active, actions]);
  // Up in the empty composer opens my latest message's editor (counted: each press asks anew)
  const [editRequest, setEditRequest] = useState(0);
  const onEditLast = useCallback(() => {
    const room = state.active ? state.rooms[state.active] : undefined;
    if (status !== "connected" || !editable(room)) return false;
    setEditRequest((n) => n + 1);
    return true;
  }, [state.active, state.rooms, status]);
  const onRate = useCallback(
    (m: ChatMessage, rating: Rating | null) => {
      if (!state.active) return;
      // a thumbs down asks what was wrong (optional: cancel or leave it empty)
      const comment = rating === "down" ? (window.prompt("What was wrong with this answer? (optional)") ?? "") : "";
      actions.rate(state.active, m.id, rating, comment.trim() || undefined);
    },
    [state.active, actions],
  );

  if (auth.phase === "checking") {
    return (
      <div className="signin-wrap">
        <p role="status">Loading…</p>
      </div>
    );
  }
  if (auth.phase === "signin") {
    return (
      <>
        <ThemeToggle theme={theme} onToggle={toggle} floating />
        <SignIn
          api={api}
          onSignedIn={(user) => {
            actions.dismissBanner();
            setAuth({ phase: "ready", mode: "jwt", user });
          }}
        />
      </>
    );
  }

  const room = state.active ? state.rooms[state.active] : undefined;
  const streaming = streamingReplies(room).length > 0;
  const typers = typingUsers(room, Date.now());
  const offline = status !== "connected";
  const queued = Object.values(state.rooms).reduce((n, r) => n + r.items.filter((i) => i.kind === "message" && i.pending && !i.failed).length, 0);

  return (
    <div className={`app${drawer ? " drawer-open" : ""}`} {...dropProps}>
      <a href="#composer" className="skip-link">
        Skip to the message box
      </a>
      <header className="topbar">
        <button type="button" className="icon menu" aria-label="Rooms and conversations" aria-expanded={drawer} aria-controls="sidebar" onClick={() => setDrawer((d) => !d)}>
          ☰
        </button>
        <h1 className="brand">rag_chat</h1>
        <span className="room-name" aria-live="polite">
          {room ? (room.kind === "room" ? `#${room.id}` : room.title || "New conversation") : ""}
        </span>
        {room && hasMessages(room) && (
          <button type="button" className="small export" data-testid="export" onClick={() => downloadText(exportFileName(room), conversationMarkdown(room))} title="Download this conversation as a Markdown file">
            Export
          </button>
        )}
        <StatusIndicator status={status} detail={detail} queued={queued} />
        <ThemeToggle theme={theme} onToggle={toggle} />
        {auth.mode === "jwt" && (
          <div className="account">
            {authUser && <span className="user">{authUser}</span>}
            <button type="button" className="small" onClick={() => void signOut()}>
              Sign out
            </button>
          </div>
        )}
      </header>

      <aside id="sidebar" className="sidebar">
        <Sidebar
          state={state}
          recentRooms={recentRooms}
          conversations={conversations}
          conversationsError={conversationsError}
          showName={auth.mode === "open"}
          name={name}
          onName={(n) => {
            setName(n);
            store.setName(n);
          }}
          onJoin={join}
          onLeave={(r) => actions.leaveRoom(r)}
          onSelect={(r) => {
            actions.select(r);
            setDrawer(false);
          }}
          onNewChat={() => {
            actions.newConversation();
            setDrawer(false);
          }}
          onOpenConversation={(c) => {
            actions.openConversation(c.id, c.title);
            setDrawer(false);
          }}
          onDeleteConversation={(id) => void deleteConversation(id)}
          onRenameConversation={(id) => void renameConversation(id)}
          onLoadOlderConversations={nextBefore !== null ? loadOlderConversations : undefined}
          onForgetRecent={(r) => setRecentRooms(store.removeRecentRoom(r))}
        >
          <section aria-labelledby="docs-h">
            <h2 id="docs-h">Documents</h2>
            <Uploads tasks={uploads.tasks} onFiles={uploads.add} onDismiss={uploads.dismiss} />
            <YourDocuments documents={docs.documents} removing={docs.removing} error={docs.error} onRemove={(n) => {
                // as deleting a conversation: one click must not lose a document
                if (window.confirm(`Remove “${n}”? The file is deleted from the server and its passages leave the index.`)) void docs.remove(n);
              }}
            />
          </section>
        </Sidebar>
      </aside>
      {drawer && <div className="scrim" onClick={() => setDrawer(false)} aria-hidden="true" />}

      <main className="chat" id="main">
        {state.banner && (
          <div className={`banner ${state.banner.code === "rate_limited" ? "warn" : "error"}`} role="alert">
            <span>
              {state.banner.code === "rate_limited" ? "Slow down: " : ""}
              {state.banner.message}
            </span>
            <button type="button" className="icon" onClick={actions.dismissBanner} aria-label="Dismiss">
              ✕
            </button>
          </div>
        )}
        {room ? (
          <>
            <Timeline
              room={room}
              offline={offline}
              onOpenSource={setSource}
              onRetry={onRetry}
              onRegenerate={onRegenerate}
              onEdit={onEdit}
              editRequest={editRequest}
              onRate={onRate}
              empty={
                room.kind === "room" ? (
                  <p className="empty">{room.joined ? `No messages in #${room.id} yet. Mention @ai (or press AI) to ask the assistant.` : `Joining #${room.id}…`}</p>
                ) : (
                  <div className="empty">
                    <h2>Ask about your documents</h2>
                    <p>Answers stream in and cite their sources as [1], [2]… — click one to see the passage. Add documents from the sidebar or drop them here.</p>
                  </div>
                )
              }
            />
            <p className="typing" data-testid="typing" aria-live="polite">
              {typingLine(typers)}
            </p>
            <Composer roomId={room.id} kind={room.kind} streaming={streaming} offline={offline} onSend={actions.send} onStop={actions.stop} onTyping={actions.typing} onEditLast={onEditLast} />
          </>
        ) : (
          <div className="empty">
            <button type="button" className="primary" onClick={() => actions.newConversation()}>
              Start a conversation
            </button>
          </div>
        )}
      </main>

      {source && <SourcePanel open={source} onClose={closeSource} />}
      {dragging && (
        <div className="dropzone" aria-hidden="true">
          <p>Drop files to add them to the documents</p>
        </div>
      )}
    </div>
  );
}

function ThemeToggle({ theme, onToggle, floating }: { theme: "light" | "dark"; onToggle: () => void; floating?: boolean }) {
  const next = theme === "dark" ? "light" : "dark";
  return (
    <button type="button" className={floating ? "icon theme floating" : "icon theme"} data-testid="theme-toggle" onClick={onToggle} aria-label={`Switch to ${next} theme`} title={`Switch to ${next} theme`}>
      {theme === "dark" ? "☀" : "☾"}
    </button>
  );
}
