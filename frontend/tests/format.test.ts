import { describe, expect, it } from "vitest";
import { matchesFilter } from "../src/ui/format";

describe("matchesFilter", () => {
  it("finds every word of the filter in the title, in any order, case and accents aside", () => {
    expect(matchesFilter("Quarterly budget notes", "")).toBe(true);
    expect(matchesFilter("Quarterly budget notes", "   ")).toBe(true);
    expect(matchesFilter("Quarterly budget notes", "BUDGET")).toBe(true);
    expect(matchesFilter("Quarterly budget notes", "notes quart")).toBe(true);
    expect(matchesFilter("Quarterly budget notes", "budget 2025")).toBe(false);
    expect(matchesFilter("Café près de l'école", "cafe ecole")).toBe(true);
    expect(matchesFilter("Über Größe", "über")).toBe(true);
    expect(matchesFilter(null, "x")).toBe(false);
    expect(matchesFilter(null, "")).toBe(true);
  });
});
