/** Light/dark: the system's preference unless the user picked one (kept in localStorage). */
import { useCallback, useEffect, useState } from "react";
import type { Store, Theme } from "../state/storage";

function systemTheme(): Theme {
  return typeof matchMedia === "function" && matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

export function applyTheme(theme: Theme | null): void {
  const root = document.documentElement;
  if (theme) root.dataset.theme = theme;
  else delete root.dataset.theme;
}

export function useTheme(store: Store) {
  const [chosen, setChosen] = useState<Theme | null>(() => store.theme());
  const [system, setSystem] = useState<Theme>(systemTheme);

  useEffect(() => {
    if (typeof matchMedia !== "function") return;
    const mq = matchMedia("(prefers-color-scheme: dark)");
    const on = () => setSystem(mq.matches ? "dark" : "light");
    mq.addEventListener("change", on);
    return () => mq.removeEventListener("change", on);
  }, []);

  useEffect(() => applyTheme(chosen), [chosen]);

  const effective = chosen ?? system;
  const toggle = useCallback(() => {
    const next: Theme = effective === "dark" ? "light" : "dark";
    // back to following the system when the choice matches it
    const keep = next === system ? null : next;
    store.setTheme(keep);
    setChosen(keep);
  }, [effective, system, store]);

  return { theme: effective, toggle };
}
