/**
 * Exponential backoff with jitter for reconnects.
 *
 * The ceiling for attempt `a` (0-based) is `min(maxMs, baseMs * factor^a)`; the delay is drawn
 * uniformly from `[ceiling * (1 - jitter), ceiling]` ("equal jitter" with jitter = 0.5): never
 * zero, so a fleet of clients kicked off by one server restart spreads out instead of
 * reconnecting in lock step.
 */
export interface BackoffOptions {
  baseMs: number;
  maxMs: number;
  factor: number;
  /** Fraction of the ceiling that is random, 0..1. */
  jitter: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 500, maxMs: 30_000, factor: 2, jitter: 0.5 };

export function backoffCeiling(attempt: number, opts: BackoffOptions = DEFAULT_BACKOFF): number {
  const a = Math.max(0, Math.floor(attempt));
  // cap the exponent so huge attempt counts cannot overflow to Infinity/NaN
  const exp = opts.baseMs * Math.pow(opts.factor, Math.min(a, 60));
  return Math.min(opts.maxMs, exp);
}

/** The [min, max] a delay for `attempt` can take. */
export function backoffBounds(
  attempt: number,
  opts: BackoffOptions = DEFAULT_BACKOFF,
): [number, number] {
  const ceiling = backoffCeiling(attempt, opts);
  const jitter = Math.min(1, Math.max(0, opts.jitter));
  return [ceiling * (1 - jitter), ceiling];
}

/** A delay in ms for `attempt`; `random` returns [0, 1) like Math.random. */
export function backoffDelay(
  attempt: number,
  random: () => number = Math.random,
  opts: BackoffOptions = DEFAULT_BACKOFF,
): number {
  const [lo, hi] = backoffBounds(attempt, opts);
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.round(lo + (hi - lo) * r);
}
