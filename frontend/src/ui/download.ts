/** Save ``text`` as a file named ``name`` (the browser's download, nothing sent anywhere). */
export function downloadText(name: string, text: string, type = "text/markdown;charset=utf-8"): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.rel = "noopener";
  document.body.appendChild(a);
  a.click();
  a.remove();
  // the download has its own copy once it started; the object URL can go a little later
  window.setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
