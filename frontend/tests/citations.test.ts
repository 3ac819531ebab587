import { describe, expect, it } from "vitest";
import { citationsInMarkdown, maskCode, splitCitations } from "../src/state/citations";
import { sourceVerdict } from "../src/ui/MessageView";

describe("splitCitations", () => {
  it("splits [1] and adjacent [2][3]", () => {
    expect(splitCitations("Use port 8000 [1]. See [2][3].", 3)).toEqual(["Use port 8000 ", { n: 1 }, ". See ", { n: 2 }, { n: 3 }, "."]);
  });
  it("leaves numbers beyond the sources, zero and non-markers as text", () => {
    expect(splitCitations("a [4] b [0] c [1] d [x] [12a] [1000]", 3)).toEqual(["a [4] b [0] c ", { n: 1 }, " d [x] [12a] [1000]"]);
    expect(splitCitations("no sources [1]", 0)).toEqual(["no sources [1]"]);
    expect(splitCitations("", 3)).toEqual([]);
  });
  it("handles markers at the edges", () => {
    expect(splitCitations("[1]", 1)).toEqual([{ n: 1 }]);
    expect(splitCitations("[2] x [1]", 2)).toEqual([{ n: 2 }, " x ", { n: 1 }]);
  });
});

describe("citationsInMarkdown", () => {
  it("finds unique cited sources in order", () => {
    expect(citationsInMarkdown("B [2] and A [1][2], again [1].", 5)).toEqual([1, 2]);
  });
  it("ignores numbers beyond the sources", () => {
    expect(citationsInMarkdown("[1] [6] [99]", 5)).toEqual([1]);
  });
  it("ignores markers inside code", () => {
    const md = [
      "Index with `arr[1]` and [2].",
      "```python",
      "x = a[3]",
      "```",
      "~~~",
      "b[4]",
      "~~~",
      "``code with ` [5]`` then [1]",
    ].join("\n");
    expect(citationsInMarkdown(md, 9)).toEqual([1, 2]);
  });
  it("an unterminated fence (still streaming) hides the rest", () => {
    expect(citationsInMarkdown("see [1]\n```\ny[2]", 3)).toEqual([1]);
  });
  it("skips links and reference definitions", () => {
    expect(citationsInMarkdown("[1](http://x) and [2]\n[3]: http://y", 3)).toEqual([2]);
  });
});

describe("maskCode", () => {
  it("keeps length and newlines", () => {
    const md = "a `b[1]` c\n```\n[2]\n```\nd";
    const out = maskCode(md);
    expect(out).toHaveLength(md.length);
    expect(out.split("\n")).toHaveLength(md.split("\n").length);
    expect(out).not.toContain("[");
  });
  it("an unmatched backtick is literal", () => {
    expect(maskCode("a ` b [1]")).toBe("a ` b [1]");
  });
});

describe("sourceVerdict (the source list of an answer)", () => {
  const cited = new Set([1]);
  const unsupported = new Set([2]);
  it("after the check: cited only when it supports its sentence, unsupported and uncited marked", () => {
    expect([1, 2, 3].map((n) => sourceVerdict(n, cited, unsupported, true))).toEqual(["cited", "unsupported", "uncited"]);
  });
  it("while streaming (not checked yet): only the markers seen so far", () => {
    expect([1, 2, 3].map((n) => sourceVerdict(n, cited, unsupported, false))).toEqual(["cited", null, null]);
  });
});
