// The generated wire types must match the schema the server exports: regenerate and compare.
// (src/protocol.ts checks at compile time that the UI's own types fit the generated ones.)
import { describe, expect, it } from "vitest";
// @ts-expect-error -- a plain .mjs build script, no type declarations
import { generate } from "../scripts/gen-wire.mjs";
import committed from "../src/wire.gen.ts?raw";
import schema from "../src/wire.schema.json";

describe("wire types", () => {
  it("src/wire.gen.ts is what src/wire.schema.json generates (run `npm run gen:wire`)", async () => {
    const fresh: string = await generate();
    expect(committed).toBe(fresh);
  });

  it("the schema names every event of both directions", () => {
    const defs = schema.$defs as Record<string, { discriminator?: { mapping: object } }>;
    const tags = (name: string) => Object.keys(defs[name]?.discriminator?.mapping ?? {}).sort();
    expect(tags("ClientEvent")).toEqual([
      "auth",
      "cancel",
      "edit",
      "join",
      "leave",
      "message",
      "ping",
      "rate",
      "regenerate",
      "typing",
    ]);
    expect(tags("ServerEvent")).toContain("ai.token");
  });
});
