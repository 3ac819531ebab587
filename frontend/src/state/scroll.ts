/** Auto-scroll: follow the stream while the reader is at the bottom, not after they scroll up. */
export interface ScrollMetrics {
  scrollTop: number;
  scrollHeight: number;
  clientHeight: number;
}

export function distanceFromBottom(m: ScrollMetrics): number {
  return Math.max(0, m.scrollHeight - m.scrollTop - m.clientHeight);
}

export function isNearBottom(m: ScrollMetrics, threshold = 48): boolean {
  return distanceFromBottom(m) <= threshold;
}
