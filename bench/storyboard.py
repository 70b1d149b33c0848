"""Benchmark of the story writer with SmolLM2 offline: time to a storyboard, tokens/s, grammar cost.

    .venv/bin/python bench/storyboard.py                 # 2 storyboards of 3 scenes, 1 thread
    .venv/bin/python bench/storyboard.py --threads 2 --scenes 4 --repeat 3
    .venv/bin/python bench/storyboard.py --outlines      # also time outlines' llguidance path

It loads SmolLM2-135M-Instruct in process (the local backend), then:

1. compiles the two step schemas (cast, shot) and uses them again, printing
   both times: each schema is compiled once per process and cached;
2. writes ``--repeat`` storyboards of ``--scenes`` scenes and prints, for each,
   the wall time, the new tokens of every step together and tokens per second;
3. times constrained against unconstrained generation for the same number of
   tokens: the cast step's constrained answer first, then free sampling of
   exactly as many tokens from the same prompt (end-of-sequence masked).
   Constrained decoding feeds the tokens the grammar forces (keys, punctuation)
   in one forward pass each, so it can cost less per token than free decoding.

The last line is ``constrained/unconstrained ratio: X`` (median over
``--repeat`` pairs). Timings on a shared machine are noisy: compare ratios, and
pin ``--threads`` to the cores the process really gets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "A lighthouse keeper befriends a lost whale",
    "Two kids find a dragon egg in the attic",
    "An astronaut plants a garden on Mars",
    "A shy cat runs for mayor of a small town",
]
STORY = (
    "Mila lived by the sea with her old dog Bo. One windy morning she found a red kite on "
    "the beach. She ran along the sand and the kite rose over the waves. Bo barked at the gulls."
)


class CountingBackend:
    """Wraps the local backend and sums the cost of every generation through it."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.name = backend.name
        self.constrains_json = backend.constrains_json
        self.reset()

    def reset(self) -> None:
        self.new_tokens = self.sampled_tokens = 0
        self.seconds = 0.0

    def _count(self) -> None:
        stats = self.backend.last_stats
        self.new_tokens += stats.new_tokens
        self.sampled_tokens += stats.sampled_tokens
        self.seconds += stats.seconds

    def generate_text(self, messages, max_new_tokens, seed):
        text = self.backend.generate_text(messages, max_new_tokens, seed)
        self._count()
        return text

    def generate_json(self, messages, schema, max_new_tokens, seed):
        text = self.backend.generate_json(messages, schema, max_new_tokens, seed)
        self._count()
        return text

    def load(self) -> None:
        self.backend.load()

    def interrupt(self) -> None:
        self.backend.interrupt()

    def close(self) -> None:
        self.backend.close()


def time_outlines(backend, messages, schema, tokens: int, seed: int) -> tuple[float, float, int]:
    """(constrained s, unconstrained s, tokens) with outlines' llguidance path and HF generate."""
    import outlines
    import torch
    from outlines.inputs import Chat
    from outlines.types import JsonSchema

    model, tokenizer = backend._model, backend.tokenizer
    generator = outlines.Generator(
        outlines.from_transformers(model, tokenizer),
        JsonSchema({**schema, "x-guidance": {"whitespace_flexible": False}}),
        backend="llguidance",
    )
    generator(Chat([dict(m) for m in messages]), max_new_tokens=8)  # warm-up: lazy setup
    torch.manual_seed(seed)
    started = time.perf_counter()
    text = generator(
        Chat([dict(m) for m in messages]), max_new_tokens=tokens, do_sample=True, temperature=0.7
    )
    constrained = time.perf_counter() - started
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, max_new_tokens=count, min_new_tokens=count, do_sample=True, temperature=0.7
        )
    return constrained, time.perf_counter() - started, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--outlines", action="store_true", help="also time outlines 1.3 with its llguidance backend"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "services" / "llm"))
    from storyreel_llm.backends.local import LocalBackend
    from storyreel_llm.prompts import cast_messages
    from storyreel_llm.settings import LLMSettings
    from storyreel_llm.storyboard import cast_schema, shot_schema
    from storyreel_llm.writer import StoryboardWriter

    settings = LLMSettings(model=args.model, torch_threads=args.threads)
    local = LocalBackend(settings)
    started = time.perf_counter()
    local.load()
    print(
        f"model: {args.model} loaded in {time.perf_counter() - started:.1f} s, "
        f"torch threads: {args.threads or 'default'}"
    )

    caps = settings.text_caps()
    for name, schema in (("cast", cast_schema(caps)), ("shot", shot_schema(caps))):
        started = time.perf_counter()
        local.matcher(schema)
        first = time.perf_counter() - started
        started = time.perf_counter()
        local.matcher(schema)
        again = time.perf_counter() - started
        print(f"schema {name}: compiled in {first * 1000:.1f} ms, reused in {again * 1000:.3f} ms")

    backend = CountingBackend(local)
    writer = StoryboardWriter(backend, settings)
    walls, rates = [], []
    for run in range(args.repeat):
        backend.reset()
        prompt = PROMPTS[run % len(PROMPTS)]
        started = time.perf_counter()
        board = writer.write(prompt, args.scenes, "", seed=args.seed + run)
        wall = time.perf_counter() - started
        rate = backend.new_tokens / backend.seconds if backend.seconds else 0.0
        walls.append(wall)
        rates.append(rate)
        print(
            f"storyboard {run + 1}: {args.scenes} scenes in {wall:.1f} s, "
            f"{backend.new_tokens} new tokens ({backend.sampled_tokens} sampled), "
            f"{rate:.1f} tokens/s, degraded: {board.degraded}"
        )
    print(
        f"time to a storyboard ({args.scenes} scenes, median of {args.repeat}): "
        f"{statistics.median(walls):.1f} s"
    )
    print(f"tokens/s over all steps (median): {statistics.median(rates):.1f}")

    messages = cast_messages(STORY, settings.max_characters)
    schema = cast_schema(caps)
    local.generate_json(messages, schema, 8, seed=1)  # warm-up
    ratios = []
    for run in range(args.repeat):
        local.generate_json(messages, schema, settings.cast_max_tokens, seed=args.seed + run)
        constrained = local.last_stats
        local.generate_tokens(
            messages, constrained.new_tokens, seed=args.seed + run, ignore_eos=True
        )
        free = local.last_stats
        assert free.new_tokens == constrained.new_tokens
        ratio = constrained.seconds / free.seconds
        # The grammar's own cost per step, fast-forwarded tokens aside.
        per_pass = (constrained.seconds / constrained.forward_passes) / (
            free.seconds / free.forward_passes
        )
        ratios.append(ratio)
        print(
            f"same {constrained.new_tokens} tokens: constrained {constrained.seconds:.2f} s "
            f"({constrained.tokens_per_s:.1f} tokens/s, {constrained.sampled_tokens} sampled, "
            f"{constrained.forward_passes} forward passes), unconstrained {free.seconds:.2f} s "
            f"({free.tokens_per_s:.1f} tokens/s): {ratio:.2f} (per forward pass {per_pass:.2f})"
        )
    if args.outlines:
        c, u, n = time_outlines(local, messages, schema, settings.cast_max_tokens, args.seed)
        print(
            f"outlines + llguidance, same {n} tokens: constrained {c:.2f} s, "
            f"transformers generate {u:.2f} s: ratio {c / u:.2f}"
        )
    print(f"constrained/unconstrained ratio: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
