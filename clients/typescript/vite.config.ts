// Builds the dashboard (dashboard/) into the Python package, where the daemon serves it at /ui.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

export default defineConfig({
  root: fileURLToPath(new URL("./dashboard", import.meta.url)),
  base: "/ui/",
  logLevel: "warn",
  build: {
    outDir: process.env.NUCLEUS_UI_OUT ?? fileURLToPath(new URL("../../nucleus_actors/daemon/dashboard", import.meta.url)),
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    modulePreload: { polyfill: false },
    reportCompressedSize: false,
    assetsInlineLimit: 0,
  },
});
