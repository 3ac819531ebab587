// @vitest-environment jsdom
import { afterEach, describe, expect, it, vi } from "vitest";
import { copyText } from "../src/ui/CopyButton";

function setClipboard(clipboard: unknown) {
  Object.defineProperty(window.navigator, "clipboard", { value: clipboard, configurable: true });
}

afterEach(() => {
  setClipboard(undefined);
  vi.restoreAllMocks();
  delete (document as { execCommand?: unknown }).execCommand;
});

describe("copyText", () => {
  it("uses the Clipboard API where there is one", async () => {
    const writeText = vi.fn(async () => undefined);
    setClipboard({ writeText });
    expect(await copyText("an answer [1]")).toBe(true);
    expect(writeText).toHaveBeenCalledWith("an answer [1]");
  });

  it("falls back to a selected textarea when the API refuses or is missing, and leaves nothing behind", async () => {
    const selected: string[] = [];
    const exec = vi.fn((cmd: string) => {
      selected.push(`${cmd}:${(document.activeElement as HTMLTextAreaElement | null)?.value ?? ""}`);
      return true;
    });
    Object.defineProperty(document, "execCommand", { value: exec, configurable: true });
    const input = document.body.appendChild(document.createElement("input"));
    input.focus();

    setClipboard({ writeText: vi.fn(async () => Promise.reject(new Error("NotAllowedError"))) });
    expect(await copyText("first")).toBe(true);
    setClipboard(undefined); // plain http from another host: no navigator.clipboard
    expect(await copyText("second")).toBe(true);

    expect(selected).toEqual(["copy:first", "copy:second"]);
    expect(document.querySelector("textarea")).toBeNull();
    expect(document.activeElement).toBe(input); // focus goes back where it was
    input.remove();
  });

  it("says false when nothing could copy", async () => {
    setClipboard(undefined);
    Object.defineProperty(document, "execCommand", { value: () => false, configurable: true });
    expect(await copyText("x")).toBe(false);
    Object.defineProperty(document, "execCommand", {
      value: () => {
        throw new Error("not supported");
      },
      configurable: true,
    });
    expect(await copyText("x")).toBe(false);
    expect(document.querySelector("textarea")).toBeNull();
  });
});
