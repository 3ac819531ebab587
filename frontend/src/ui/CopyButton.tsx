import { useEffect, useRef, useState } from "react";

/** Put ``text`` on the clipboard: the Clipboard API where the page may use it (a secure
 * context: https, or localhost), else the old way through a hidden textarea (a page served
 * over plain http from another host has no navigator.clipboard). False when neither worked. */
export async function copyText(text: string, doc: Document = document): Promise<boolean> {
  const clipboard = doc.defaultView?.navigator.clipboard;
  if (clipboard?.writeText) {
    try {
      await clipboard.writeText(text);
      return true;
    } catch {
      // refused (no permission, the page not focused): try the old way
    }
  }
  const area = doc.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  doc.body.appendChild(area);
  const active = doc.activeElement as HTMLElement | null;
  try {
    area.focus({ preventScroll: true });
    area.select();
    return typeof doc.execCommand === "function" && doc.execCommand("copy");
  } catch {
    return false;
  } finally {
    area.remove();
    active?.focus?.();
  }
}

type State = "idle" | "copied" | "failed";
const LABEL: Record<State, string> = { idle: "Copy", copied: "Copied", failed: "Copy failed" };

/** A button that copies ``text`` (an answer's markdown, citations included) and says so. */
export function CopyButton({ text, what }: { text: string; what: string }) {
  const [state, setState] = useState<State>("idle");
  const timer = useRef<number | undefined>(undefined);
  useEffect(() => () => window.clearTimeout(timer.current), []);
  const copy = async () => {
    const ok = await copyText(text);
    setState(ok ? "copied" : "failed");
    window.clearTimeout(timer.current);
    timer.current = window.setTimeout(() => setState("idle"), 2000);
  };
  return (
    <button type="button" className="link copy" onClick={() => void copy()} title={`Copy ${what} (markdown)`} data-testid="copy">
      <span aria-live="polite">{LABEL[state]}</span>
    </button>
  );
}
