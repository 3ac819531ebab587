import { defineConfig } from "vitest/config";

// No React plugin: esbuild compiles TSX with the automatic JSX runtime (no Babel, no fast
// refresh), which keeps the dependency tree small.
export default defineConfig({
  base: "/",
  esbuild: { jsx: "automatic" },
  build: {
    outDir: "dist",
    assetsDir: "assets",
    sourcemap: false,
    // always files under /assets/, never data: URLs (a strict CSP can then say img-src 'self')
    assetsInlineLimit: 0,
    target: "es2022",
  },
  server: {
    // `npm run dev` against a server on :8000
    proxy: {
      "/api": "http://127.0.0.1:8000",
      "/ws": { target: "ws://127.0.0.1:8000", ws: true },
    },
  },
  test: {
    include: ["tests/**/*.test.ts"],
    environment: "node",
  },
});
