import { useState, type FormEvent } from "react";
import { ApiError, type Api } from "../net/api";

interface Props {
  api: Api;
  onSignedIn: (user: string) => void;
}

/** The server requires auth: paste an access token; the server answers with a session cookie. */
export function SignIn({ api, onSignedIn }: Props) {
  const [token, setToken] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) return;
    setBusy(true);
    setError(null);
    try {
      const session = await api.signIn(t);
      setToken("");
      onSignedIn(session.user);
    } catch (err) {
      setError(err instanceof ApiError && err.status === 401 ? "That token was not accepted." : err instanceof Error ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="signin-wrap">
      <form className="signin" onSubmit={submit} aria-labelledby="signin-title">
        <h1 id="signin-title">Sign in to rag_chat</h1>
        <p>This server requires an access token. Paste yours below; the browser then keeps a session cookie.</p>
        <label htmlFor="signin-token">Access token</label>
        <textarea
          id="signin-token"
          data-testid="signin-token"
          value={token}
          onChange={(e) => setToken(e.target.value)}
          rows={4}
          autoComplete="off"
          spellCheck={false}
          autoFocus
          aria-invalid={error ? true : undefined}
          aria-describedby={error ? "signin-error" : undefined}
          onKeyDown={(e) => {
            if (e.key === "Enter" && !e.shiftKey) {
              e.preventDefault();
              e.currentTarget.form?.requestSubmit();
            }
          }}
        />
        {error && (
          <p id="signin-error" className="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" className="primary" data-testid="signin-submit" disabled={busy || !token.trim()}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </div>
  );
}
