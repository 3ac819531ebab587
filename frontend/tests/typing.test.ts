import { describe, expect, it } from "vitest";
import { TypingThrottle } from "../src/net/typing";
import { distanceFromBottom, isNearBottom } from "../src/state/scroll";

describe("TypingThrottle", () => {
  it("sends start once per interval while typing, stop once", () => {
    const t = new TypingThrottle(3000);
    expect(t.input(0, true)).toBe("start");
    expect(t.input(100, true)).toBeNull();
    expect(t.input(2999, true)).toBeNull();
    expect(t.input(3000, true)).toBe("start");
    expect(t.stop()).toBe("stop");
    expect(t.stop()).toBeNull();
    expect(t.input(3100, true)).toBe("start");
  });
  it("an emptied composer stops; nothing when not typing", () => {
    const t = new TypingThrottle();
    expect(t.input(0, false)).toBeNull();
    t.input(0, true);
    expect(t.typing).toBe(true);
    expect(t.input(10, false)).toBe("stop");
    expect(t.typing).toBe(false);
  });
});

describe("auto-scroll", () => {
  it("is near the bottom within the threshold", () => {
    expect(distanceFromBottom({ scrollTop: 500, scrollHeight: 1000, clientHeight: 500 })).toBe(0);
    expect(isNearBottom({ scrollTop: 460, scrollHeight: 1000, clientHeight: 500 })).toBe(true);
    expect(isNearBottom({ scrollTop: 400, scrollHeight: 1000, clientHeight: 500 })).toBe(false);
    expect(isNearBottom({ scrollTop: 0, scrollHeight: 300, clientHeight: 500 })).toBe(true);
  });
});
