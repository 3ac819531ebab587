// @vitest-environment jsdom
import { describe, expect, it } from "vitest";
import { renderMarkdown } from "../src/render/markdown";

const render = (md: string, nSources = 0, extra = {}) => {
  const html = renderMarkdown(md, { nSources, ...extra });
  const div = document.createElement("div");
  div.innerHTML = html;
  return { html, div };
};

describe("renderMarkdown", () => {
  it("renders code blocks, lists and tables", () => {
    const { div } = render("# T\n\n- a\n- b\n\n1. x\n\n```js\nlet a = 1;\n```\n\n| h | i |\n|---|---|\n| 1 | 2 |\n\n`inline` **b** ~~s~~");
    expect(div.querySelectorAll("ul li")).toHaveLength(2);
    expect(div.querySelector("ol li")?.textContent).toBe("x");
    expect(div.querySelector("pre code.language-js")?.textContent).toContain("let a = 1;");
    expect(div.querySelectorAll("table td")).toHaveLength(2);
    expect(div.querySelector("strong")?.textContent).toBe("b");
    expect(div.querySelector("del")?.textContent).toBe("s");
  });

  it("shows raw HTML as text, never as markup", () => {
    const { div } = render('hi <img src=x onerror="alert(1)"> <script>alert(2)</script>\n\n<div onclick="x()">block</div>\n\n<iframe src="https://evil"></iframe>');
    expect(div.querySelector("img, script, iframe, [onclick], [onerror]")).toBeNull();
    expect(div.textContent).toContain("<script>alert(2)</script>");
    expect(div.textContent).toContain("<img src=x");
  });

  it("drops javascript:, data: and vbscript: links", () => {
    const { div } = render("[a](javascript:alert(1)) [b](JaVaScRiPt:alert(1)) [c](data:text/html,<script>x</script>) [d](vbscript:x) [e](https://ok.example/x) [f](docs/x.md) <javascript:alert(1)>");
    const hrefs = [...div.querySelectorAll("a")].map((a) => a.getAttribute("href"));
    for (const h of hrefs) {
      if (h === null) continue;
      expect(h.toLowerCase()).not.toMatch(/^(javascript|data|vbscript):/);
    }
    expect(hrefs).toContain("https://ok.example/x");
    expect(hrefs).toContain("docs/x.md");
    const ok = [...div.querySelectorAll("a")].find((a) => a.getAttribute("href") === "https://ok.example/x")!;
    expect(ok.getAttribute("target")).toBe("_blank");
    expect(ok.getAttribute("rel")).toContain("noopener");
  });

  it("turns images into links (nothing loads without a click)", () => {
    const { div } = render("![secret](https://tracker.example/p?q=data)");
    expect(div.querySelector("img")).toBeNull();
    expect(div.querySelector("a")?.getAttribute("href")).toBe("https://tracker.example/p?q=data");
    expect(div.textContent?.trim()).toBe("secret");
  });

  it("strips styles, event handlers and foreign classes", () => {
    const { div } = render("```evil onmouseover=x\ncode\n```");
    expect(div.querySelector("[onmouseover]")).toBeNull();
    expect(div.innerHTML).not.toContain("style=");
  });

  it("makes [n] citation buttons outside code, within the sources", () => {
    const { div } = render("Port 8000 [1][2]. Beyond [3]. Code `a[1]` and\n\n```\nb[2]\n```\n\n[link [1]](https://x.example)", 2, { unsupported: [2], label: (n: number) => `Source ${n}: Doc` });
    const buttons = [...div.querySelectorAll("button[data-citation]")];
    expect(buttons.map((b) => b.getAttribute("data-citation"))).toEqual(["1", "2"]);
    expect(buttons[0]!.getAttribute("data-testid")).toBe("citation");
    expect(buttons[0]!.getAttribute("aria-label")).toBe("Source 1: Doc");
    expect(buttons[0]!.textContent).toBe("[1]");
    expect(buttons[1]!.className).toContain("unsupported");
    expect(div.textContent).toContain("Beyond [3]");
    expect(div.querySelector("code")?.textContent).toBe("a[1]");
  });

  it("a citation marker in the model's raw HTML cannot smuggle a button", () => {
    const { div } = render('<button data-citation="1" onclick="x()">[1]</button>', 0);
    expect(div.querySelector("button")).toBeNull();
  });

  it("task lists keep read-only checkboxes only", () => {
    const { div } = render("- [x] done\n- [ ] todo");
    const boxes = div.querySelectorAll("input");
    expect(boxes).toHaveLength(2);
    for (const b of boxes) {
      expect(b.getAttribute("type")).toBe("checkbox");
      expect(b.hasAttribute("disabled")).toBe(true);
    }
  });
});
