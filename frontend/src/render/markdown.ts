/**
 * Markdown → safe HTML for answers (needs a DOM: the browser, or jsdom in tests).
 *
 * Nothing from the model or a document can run or load anything:
 * - raw HTML in the markdown is shown as text (marked's `html` renderer escapes it);
 * - images become plain links (a remote image would load — and could leak data in its URL —
 *   without a click);
 * - DOMPurify then keeps a short allow-list of tags and attributes, and only http(s)/mailto
 *   or scheme-less URLs (no `javascript:`, `data:`, `vbscript:`…);
 * - links open in a new tab with `rel="noopener noreferrer nofollow"`.
 * Citation buttons are inserted after sanitising, into text nodes outside code and links.
 */
import DOMPurify, { type Config } from "dompurify";
import { Marked, type Tokens } from "marked";
import { splitCitations } from "../state/citations";

function escapeHtml(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  async: false,
  renderer: {
    html(token: Tokens.HTML | Tokens.Tag): string {
      return escapeHtml(token.text);
    },
    image(token: Tokens.Image): string {
      const label = token.text || token.href;
      return `<a href="${escapeHtml(token.href)}">${escapeHtml(label)}</a>`;
    },
  },
});

const ALLOWED_TAGS = [
  "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
  "input", "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
];
const ALLOWED_ATTR = ["href", "title", "align", "class", "start", "type", "checked", "disabled"];
// DOMPurify's own default pattern, with the schemes cut down to http(s) and mailto
const ALLOWED_URI_REGEXP = /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i;

const CONFIG: Config = {
  ALLOWED_TAGS,
  ALLOWED_ATTR,
  ALLOWED_URI_REGEXP,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
};

type Purifier = ReturnType<typeof DOMPurify>;
let purifier: Purifier | null = null;

function getPurifier(): Purifier {
  if (purifier) return purifier;
  const p = DOMPurify(window);
  p.addHook("afterSanitizeAttributes", (node: Element) => {
    const tag = node.nodeName.toLowerCase();
    if (tag === "a") {
      if (node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    }
    if (tag === "input") {
      // only GFM task-list checkboxes, never editable
      if (node.getAttribute("type") !== "checkbox") node.remove();
      else node.setAttribute("disabled", "");
    }
    const cls = node.getAttribute("class");
    if (cls !== null && !/^language-[\w+-]+$/.test(cls)) node.removeAttribute("class");
  });
  purifier = p;
  return p;
}

export interface RenderOptions {
  /** How many sources the answer has: [n] up to this becomes a citation button. */
  nSources: number;
  /** Citations the server found unsupported by their source. */
  unsupported?: readonly number[];
  /** Accessible label for citation n. */
  label?: (n: number) => string;
}

/** Markdown → sanitised HTML string with citation buttons. */
export function renderMarkdown(md: string, opts: RenderOptions): string {
  const html = marked.parse(md, { async: false });
  const fragment = getPurifier().sanitize(html, { ...CONFIG, RETURN_DOM_FRAGMENT: true });
  if (opts.nSources > 0) addCitations(fragment, opts);
  const box = document.createElement("div");
  box.appendChild(fragment);
  return box.innerHTML;
}

const SKIP = new Set(["CODE", "PRE", "A", "BUTTON"]);

function addCitations(root: DocumentFragment, opts: RenderOptions): void {
  const doc = root.ownerDocument;
  const walker = doc.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const texts: Text[] = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let skip = false;
    for (let p = n.parentNode; p && p !== root; p = p.parentNode) {
      if (SKIP.has(p.nodeName)) {
        skip = true;
        break;
      }
    }
    if (!skip && (n.nodeValue ?? "").includes("[")) texts.push(n as Text);
  }
  const unsupported = new Set(opts.unsupported ?? []);
  for (const t of texts) {
    const parts = splitCitations(t.nodeValue ?? "", opts.nSources);
    if (parts.length === 1 && typeof parts[0] === "string") continue;
    const frag = doc.createDocumentFragment();
    for (const part of parts) {
      if (typeof part === "string") {
        frag.appendChild(doc.createTextNode(part));
        continue;
      }
      const b = doc.createElement("button");
      b.type = "button";
      b.className = unsupported.has(part.n) ? "cite unsupported" : "cite";
      b.dataset.citation = String(part.n);
      b.dataset.testid = "citation";
      b.setAttribute("aria-label", opts.label ? opts.label(part.n) : `Source ${part.n}`);
      if (unsupported.has(part.n)) b.title = "The source may not support this";
      b.textContent = `[${part.n}]`;
      frag.appendChild(b);
    }
    t.replaceWith(frag);
  }
}
