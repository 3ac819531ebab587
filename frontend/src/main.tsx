import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { applyTheme } from "./hooks/useTheme";
import { createStore } from "./state/storage";
import "./styles.css";

// the chosen theme before the first render
applyTheme(createStore().theme());

const root = document.getElementById("root");
if (root) {
  createRoot(root).render(
    <StrictMode>
      <App />
    </StrictMode>,
  );
}
