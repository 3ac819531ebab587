/**
 * Citation markers: `[1]`, `[2][3]` in an answer refer to its numbered sources.
 *
 * A marker counts only when its number names a source of the answer (1..nSources), and never
 * inside code (a fenced block, an inline code span, or — in rendered HTML — a <code>/<pre>).
 * Markdown links (`[1](url)`) and reference definitions (`[1]: url`) are not markers.
 */

export type Segment = string | { n: number };

const MARKER = /\[(\d{1,3})\]/g;

function inRange(n: number, nSources: number): boolean {
  return Number.isInteger(n) && n >= 1 && n <= nSources;
}

/**
 * Split plain text (no markdown, no code: a text node of rendered HTML) into text and
 * citation segments. Markers beyond the sources stay text.
 */
export function splitCitations(text: string, nSources: number): Segment[] {
  const out: Segment[] = [];
  let last = 0;
  MARKER.lastIndex = 0;
  for (let m = MARKER.exec(text); m !== null; m = MARKER.exec(text)) {
    const n = Number(m[1]);
    if (!inRange(n, nSources)) continue;
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push({ n });
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

/**
 * Blank out code in markdown (same length, newlines kept): fenced blocks (an unterminated
 * fence — an answer still streaming — runs to the end) and inline code spans.
 */
export function maskCode(md: string): string {
  const lines = md.split("\n");
  let fence: { char: string; len: number } | null = null;
  const masked = lines.map((line) => {
    const open = /^ {0,3}(`{3,}|~{3,})/.exec(line);
    if (fence) {
      const close = new RegExp(`^ {0,3}${fence.char === "`" ? "`" : "~"}{${fence.len},}\\s*$`);
      if (close.test(line)) fence = null;
      return " ".repeat(line.length);
    }
    if (open) {
      const run = open[1]!;
      // a backtick fence's info string may not contain backticks
      if (run[0] === "~" || !line.slice(open[0].length).includes("`")) {
        fence = { char: run[0]!, len: run.length };
        return " ".repeat(line.length);
      }
    }
    return line;
  });
  return maskInlineCode(masked.join("\n"));
}

function maskInlineCode(text: string): string {
  let out = "";
  let i = 0;
  while (i < text.length) {
    if (text[i] !== "`") {
      out += text[i];
      i++;
      continue;
    }
    let j = i;
    while (text[j] === "`") j++;
    const run = j - i;
    // find a closing run of exactly the same length
    let k = j;
    let close = -1;
    while (k < text.length) {
      if (text[k] === "`") {
        let e = k;
        while (text[e] === "`") e++;
        if (e - k === run) {
          close = k;
          break;
        }
        k = e;
      } else k++;
    }
    if (close < 0) {
      out += text.slice(i, j); // an unmatched run is literal
      i = j;
      continue;
    }
    out += " ".repeat(close + run - i);
    i = close + run;
  }
  return out;
}

/** The source numbers an answer cites, unique and ascending. */
export function citationsInMarkdown(md: string, nSources: number): number[] {
  const text = maskCode(md);
  const found = new Set<number>();
  MARKER.lastIndex = 0;
  for (let m = MARKER.exec(text); m !== null; m = MARKER.exec(text)) {
    const after = text[m.index + m[0].length];
    if (after === "(") continue; // a link: [1](url)
    if (after === ":" && (m.index === 0 || text[m.index - 1] === "\n")) continue; // [1]: url
    const n = Number(m[1]);
    if (inRange(n, nSources)) found.add(n);
  }
  return [...found].sort((a, b) => a - b);
}
