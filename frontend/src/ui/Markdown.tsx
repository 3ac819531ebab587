import { memo, useMemo, type MouseEvent } from "react";
import { renderMarkdown } from "../render/markdown";

interface Props {
  text: string;
  nSources: number;
  unsupported?: readonly number[];
  label?: (n: number) => string;
  onCite?: (n: number, button: HTMLElement) => void;
  className?: string;
}

/** An answer's markdown, sanitised (see render/markdown.ts); [n] buttons call onCite. */
export const Markdown = memo(function Markdown({ text, nSources, unsupported, label, onCite, className }: Props) {
  const html = useMemo(() => renderMarkdown(text, { nSources, unsupported, label }), [text, nSources, unsupported, label]);
  const onClick = (e: MouseEvent<HTMLDivElement>) => {
    const target = e.target as Element | null;
    const button = target?.closest?.("button[data-citation]") as HTMLElement | null;
    if (!button || !onCite) return;
    e.preventDefault();
    onCite(Number(button.dataset.citation), button);
  };
  return <div className={className ? `md ${className}` : "md"} onClick={onClick} dangerouslySetInnerHTML={{ __html: html }} />;
});
