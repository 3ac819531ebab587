import { describe, expect, it } from "vitest";
import { backoffBounds, backoffCeiling, backoffDelay, DEFAULT_BACKOFF } from "../src/net/backoff";

describe("backoff", () => {
  it("grows exponentially up to the cap", () => {
    expect([0, 1, 2, 3, 4].map((a) => backoffCeiling(a))).toEqual([500, 1000, 2000, 4000, 8000]);
    expect(backoffCeiling(6)).toBe(30_000);
    expect(backoffCeiling(1000)).toBe(30_000);
    expect(Number.isFinite(backoffCeiling(1e9))).toBe(true);
  });

  it("jitter stays within [ceiling/2, ceiling]", () => {
    for (let a = 0; a < 12; a++) {
      const [lo, hi] = backoffBounds(a);
      expect(lo).toBe(backoffCeiling(a) / 2);
      expect(hi).toBe(backoffCeiling(a));
      expect(backoffDelay(a, () => 0)).toBe(Math.round(lo));
      expect(backoffDelay(a, () => 0.999999)).toBe(Math.round(hi));
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(a);
        expect(d).toBeGreaterThanOrEqual(Math.floor(lo));
        expect(d).toBeLessThanOrEqual(Math.ceil(hi));
      }
    }
  });

  it("is never zero and spreads clients out", () => {
    expect(backoffDelay(0, () => 0)).toBeGreaterThan(0);
    const delays = new Set(Array.from({ length: 20 }, (_, i) => backoffDelay(3, () => i / 20)));
    expect(delays.size).toBe(20);
  });

  it("clamps a misbehaving random source and honours options", () => {
    expect(backoffDelay(0, () => 5)).toBe(500);
    expect(backoffDelay(0, () => -1)).toBe(250);
    const opts = { ...DEFAULT_BACKOFF, baseMs: 100, maxMs: 1000, jitter: 0 };
    expect(backoffDelay(2, Math.random, opts)).toBe(400);
    expect(backoffDelay(9, Math.random, opts)).toBe(1000);
  });
});
