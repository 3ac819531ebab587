"""The embedded model's time to first token: prompts on the idle cores vs on the decode threads.

    .venv/bin/python benchmarks/prompt_threads.py [--busy] [--questions 30]

Ingests data/ into a temporary folder, builds the real prompt (hybrid retrieval, build_prompt)
for each of the guide's answer questions, and streams each through two ``LlamaCppLLM`` side by
side, alternating which goes first: the default (each prompt on the cores idle at its start)
and ``n_threads_batch=1`` (prompts on the decode thread, as before). Prints the time to the
first streamed token (p50, mean) for both, and how many threads the default chose.
``--busy`` keeps one core busy with a spinning process during the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag_chat.chat import build_prompt  # noqa: E402
from rag_chat.evalsets import guide_settings, ingest_guide, load  # noqa: E402
from rag_chat.llm.llama import LlamaCppLLM  # noqa: E402


async def first_token(llm: LlamaCppLLM, messages: list[dict[str, str]]) -> float:
    t0 = time.perf_counter()
    gen = llm.stream(messages, max_tokens=2)  # type: ignore[arg-type]
    async for _ in gen:
        break
    elapsed = time.perf_counter() - t0
    await gen.cancel()
    return elapsed


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    p.add_argument("--questions", type=int, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, guide_settings(Path(tmp)) as settings:
        retriever = ingest_guide(settings)
        models = {"idle cores": LlamaCppLLM(), "decode threads": LlamaCppLLM(n_threads_batch=1)}
        for model in models.values():
            await model.load()
        items = load("answers.jsonl", args.questions)
        prompts = [
            build_prompt(
                models["decode threads"],
                it["question"],
                retriever.search(it["question"], settings.top_k, "hybrid"),
                [],
            ).messages
            for it in items
        ]
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
        times: dict[str, list[float]] = {name: [] for name in models}
        chosen: list[int | None] = []
        try:
            await asyncio.sleep(1.0)
            for i, messages in enumerate(prompts):
                order = list(models) if i % 2 else list(reversed(models))
                for name in order:
                    times[name].append(await first_token(models[name], messages))
                    if name == "idle cores":
                        chosen.append(models[name].last_prompt_threads)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            for model in models.values():
                await model.aclose()
    print(f"{len(prompts)} guide questions, real prompts; one core busy: {args.busy}")
    for name, ts in times.items():
        print(
            f"prompt on the {name:15} first token p50 {statistics.median(ts) * 1000:7.0f} ms, "
            f"mean {statistics.mean(ts) * 1000:7.0f} ms"
        )
    counts = {n: chosen.count(n) for n in sorted({c for c in chosen if c is not None})}
    print(f"threads chosen for the prompt (threads: prompts): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
