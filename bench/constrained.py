"""Constrained-decoding overhead: 8 concurrent json_schema streams against 8 plain streams
of the same lengths, on one server, plus the per-step cost of one row's mask.

    python bench/constrained.py                 # tiny checkpoint built on the fly, ~1 minute on 2 cores
    MODEL_REPO_ID=/path/to/model python bench/constrained.py --reps 5
    python bench/constrained.py --quick         # one rep

Method. The json_schema streams run once untimed: a reasoning budget of --reasoning
tokens, then an answer that the grammar ends (EOS is the only token left once the JSON is
complete); seeded, so every run of them gives the same lengths. Plain streams with the
same seeds then run exactly as many tokens as their constrained twin (min_tokens =
max_tokens), so both keep the same rows in the batch for the same steps and differ only
by the masks. Each rep times both, in alternating order (the machine's load drifts).
Reported: aggregate tok/s of each and their
ratio, TTFT p50/p95 of each (to the first text: reasoning), and, in this process, one
row's mask + advance per token of a valid answer, the number that grows with the
vocabulary: on the model's own tokenizer (402 tokens for the tiny checkpoint), and on a
synthetic Qwen-sized one (151,643 byte-level tokens: English-like words, digit runs, JSON
punctuation, whitespace runs, Qwen's added tokens; 151,936 logits), which stands in for
Qwen's tokenizer where it cannot be downloaded. Writes bench/results/constrained.json and
.md and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from run import Server, build_model, machine, median, percentile, stream_once  # noqa: E402
from workload import chat_body  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "color", "tags", "address"], "additionalProperties": False}
EXAMPLE = {"name": "Ada Lovelace", "age": 36, "color": "green", "tags": ["math", "poet"],
           "address": {"city": "London", "zip": "12345"}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
QWEN_VOCAB, QWEN_LOGITS = 151_643, 151_936
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
              "<|video_pad|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]


def constrained_body(seed: int, reasoning: int, limit: int) -> dict:
    body = chat_body(limit, seed=seed, response_format=FORMAT, max_reasoning_tokens=reasoning)
    del body["min_tokens"], body["ignore_eos"]  # the grammar ends the answer
    return body


async def streams(server: Server, bodies: list[dict]) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(stream_once(server, body, client) for body in bodies))
        wall = time.perf_counter() - started
    ttfts = [r["ttft"] * 1000 for r in runs]
    return {"tokens": [r["tokens"] for r in runs], "aggregate_tokens_per_s": sum(r["tokens"] for r in runs) / wall,
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95)}


def measure(server: Server, reps: int, count: int, reasoning: int, limit: int) -> list[dict]:
    constrained = [constrained_body(seed, reasoning, limit) for seed in range(count)]
    lengths = asyncio.run(streams(server, constrained))["tokens"]  # untimed: the lengths the plain twins take
    plain = [chat_body(n, seed=seed) for seed, n in enumerate(lengths)]
    runs = []
    for rep in range(reps):
        order = [("constrained", constrained), ("plain", plain)]
        runs.append({kind: asyncio.run(streams(server, bodies)) for kind, bodies in order[::1 if rep % 2 else -1]})
    return runs


def synthetic_qwen_tokenizer():
    """A byte-level BPE tokenizer of Qwen's size (no merges: it stands in for the vocabulary's
    shape, which is what llguidance's per-step work depends on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = dict(zip(printable + others, map(chr, printable + [0x100 + i for i in range(len(others))])))
    spell = lambda text: "".join(table[b] for b in text.encode())  # noqa: E731
    vocab = {table[b]: b for b in range(256)}
    pieces = ['",', '":', '{"', '"}', '"]', '["', ', "', '": "', '": ', "},", "}}", "]}", "\n", "\n\n"]
    for piece in pieces + [" " * n for n in range(2, 33)] + ["\n" + " " * n for n in range(1, 33)] + [
            str(n) for n in range(1000)]:
        vocab.setdefault(spell(piece), len(vocab))
    rng, letters = random.Random(0), "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, .8, .15, .15, .1,
               .07]
    while len(vocab) < QWEN_VOCAB:
        word = "".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
        vocab.setdefault(spell(rng.choice(["", " ", " ", "_", "."]) + word), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    fast.add_tokens(QWEN_ADDED)
    return fast


def mask_costs(model: str, reps: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    width = AutoConfig.from_pretrained(model).text_config.vocab_size
    return {"model": mask_cost(AutoTokenizer.from_pretrained(model), width, reps),
            "qwen_sized": mask_cost(synthetic_qwen_tokenizer(), QWEN_LOGITS, 1)}


def mask_cost(tokenizer, width: int, reps: int) -> dict:
    """One row's mask + advance per token of a valid answer (ms), and what comes before."""
    import torch

    import main

    torch.set_num_threads(1)  # as the decode thread's share of 2 cores; the mask runs on one core
    started = time.perf_counter()
    compiler = main.GrammarCompiler(tokenizer, width, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    setup = time.perf_counter() - started
    request = main.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                         "response_format": FORMAT})
    started = time.perf_counter()
    grammar = compiler.for_request(request)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    compiler.for_request(request)
    hit = time.perf_counter() - started
    tokens = tokenizer(json.dumps(EXAMPLE, indent=1))["input_ids"]
    steps = []
    for _ in range(reps):
        row = main.RowConstraint(grammar, None, [])
        for token in tokens:
            scores = torch.zeros(width)
            started = time.perf_counter()
            row.mask(scores)
            row.advance(token)
            steps.append(time.perf_counter() - started)
    return {"vocab": width, "tokenizer_setup_ms": setup * 1000, "compile_cold_ms": cold * 1000,
            "compile_cached_ms": hit * 1000, "answer_tokens": len(tokens),
            "mask_step_median_ms": statistics.median(steps) * 1000, "mask_step_mean_ms": statistics.mean(steps) * 1000}


def table(r: dict) -> str:
    bound, free, costs = r["constrained"], r["plain"], r["mask"]
    ratio = bound["aggregate_tokens_per_s"] / free["aggregate_tokens_per_s"]
    lines = [f"Run {r['date']} on {r['machine']}; model {Path(r['model']).name}; {r['streams']} streams; "
             f"median of {r['reps']}.", "",
             "| Measure | json_schema | plain, same lengths | Ratio |", "| --- | --- | --- | --- |",
             f"| Aggregate tok/s | {bound['aggregate_tokens_per_s']:.0f} | {free['aggregate_tokens_per_s']:.0f} | "
             f"{ratio:.2f}x |",
             f"| TTFT p50 / p95, ms | {bound['ttft_p50_ms']:.1f} / {bound['ttft_p95_ms']:.1f} | "
             f"{free['ttft_p50_ms']:.1f} / {free['ttft_p95_ms']:.1f} | |",
             f"| Tokens per stream (median) | {bound['tokens_per_stream']:.0f} | {free['tokens_per_stream']:.0f} | |",
             "", "One row's grammar work, in ms:", "",
             f"| Measure | this model ({costs['model']['vocab']:,} logits) | "
             f"synthetic Qwen-sized ({costs['qwen_sized']['vocab']:,} logits) |", "| --- | --- | --- |"]
    model, qwen = costs["model"], costs["qwen_sized"]
    for label, key, digits in (("llguidance tokenizer setup (once per model load)", "tokenizer_setup_ms", 1),
                               ("compile this schema, cold", "compile_cold_ms", 2),
                               ("compile this schema, cached", "compile_cached_ms", 3),
                               ("mask + advance per token, median", "mask_step_median_ms", 3),
                               ("mask + advance per token, mean", "mask_step_mean_ms", 3)):
        lines.append(f"| {label} | {model[key]:.{digits}f} | {qwen[key]:.{digits}f} |")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    model = os.environ.get("MODEL_REPO_ID") or build_model()
    with Server.ours(model, MAX_BATCH_SIZE=str(max(8, args.streams))) as server:
        reps = measure(server, args.reps, args.streams, args.reasoning, args.max_tokens)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "model": model, "reps": args.reps,
              "streams": args.streams}
    for kind in ("constrained", "plain"):
        runs = [rep[kind] for rep in reps]
        result[kind] = {k: median([run[k] for run in runs]) for k in runs[0] if k != "tokens"}
        result[kind]["tokens_per_stream"] = median([n for run in runs for n in run["tokens"]])
    result["mask"] = mask_costs(model, args.reps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--reasoning", type=int, default=16, help="max_reasoning_tokens of the json_schema streams")
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--quick", action="store_true", help="one rep")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "constrained.json").write_text(json.dumps(result, indent=2))
    (args.out / "constrained.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
