"""The engine at full size: Qwen3-VL-2B's configuration with random weights, on one GPU.

    python bench/run.py --gpu-config          # the same as: python bench/gpu.py
    python bench/gpu.py --config tiny --no-compile --steps 16   # a smoke run on the CPU

No download: the model is built with `from_config` from the published Qwen3-VL-2B
configuration (written out below), in bfloat16, directly on the GPU. It drives the
server's own engine (main.Prefill, main.Batch: the slot KV cache and the decode step)
without HTTP, so what it times is the engine: a prompt of --prompt tokens prefilled once,
joined as B rows, then --steps decode steps of greedy picks (argmax and one copy of the
tokens to the host per step, as the worker does), eager and compiled (torch.compile and
one CUDA graph per batch size), at batch 1, 8 and 32. Next to each figure it prints the
HBM bound: the bytes a step must read (the text model's weights and lm_head, plus the KV
columns the step attends to) over the copy bandwidth measured on the same card, and raw
`model.generate()` at batch 1 as the Transformers reference.

Prints a markdown table last and writes bench/results/gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, BatchFeature, Qwen3VLConfig  # noqa: E402

import main  # noqa: E402

# Qwen/Qwen3-VL-2B-Thinking's config.json (the fields that shape compute; the rest default).
QWEN3_VL_2B = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "attention_bias": False,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                            "mrope_section": [24, 20, 20]},
    },
    "vision_config": {
        "model_type": "qwen3_vl_vision", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
        "num_heads": 16, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
    },
}


def build(config_name: str, device: torch.device, dtype: torch.dtype):
    if config_name == "2b":
        config = Qwen3VLConfig(**QWEN3_VL_2B)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import build as build_tiny

        import tempfile
        config = Qwen3VLConfig.from_pretrained(build_tiny(Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "tiny"))
    torch.manual_seed(0)
    with device:
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the bound's bandwidth)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del a, b
    return 2 * (1 << 30) / seconds


def step_bytes(model, rows: int, columns: int) -> int:
    """What one decode step must read: every text-model weight once (lm_head included; the
    embedding table is only indexed), and each row's attended KV columns."""
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    text = model.config.text_config
    per_column = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * model.dtype.itemsize
    return weights + rows * columns * per_column


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Row:
    def __init__(self, prefill: main.Prefill):
        self.position, self.rope_delta, self.last = prefill.length, prefill.rope_delta, int(prefill.logits.argmax())


def decode_rate(batch: main.Batch, prefill: main.Prefill, rows: int, steps: int, device: torch.device) -> dict:
    """Tokens/s of `rows` rows decoding `steps` steps (after 3 untimed ones), and the step's columns."""
    batch.rows = []
    batch.join([Row(prefill) for _ in range(rows)], prefill.cache, prefill.length)
    for _ in range(3):
        for row, token in zip(batch.rows, batch.forward().argmax(-1).tolist()):
            row.last = token
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        for row, token in zip(batch.rows, batch.forward().argmax(-1).tolist()):
            row.last = token
    sync(device)
    seconds = time.perf_counter() - started
    # the columns a step attends to: eager, the longest row's + 1; compiled, the whole capacity
    columns = batch.cache.capacity if batch.step.compiled else max(row.position for row in batch.rows)
    batch.rows = []
    return {"rows": rows, "tokens_per_s": rows * steps / seconds, "ms_per_step": seconds / steps * 1000,
            "columns": columns}


def profile(batch: main.Batch, prefill: main.Prefill) -> dict:
    """Batch 1: GPU time of one graph replay (events), and the kernels one step launches."""
    batch.rows = []
    batch.join([Row(prefill)], prefill.cache, prefill.length)
    batch.forward()
    graph = batch.step.graphs[1][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 50
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels = sum(e.count for e in events) / 10
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    batch.rows = []
    return {"replay_ms": replay_ms, "kernels_per_step": kernels,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in events) / 10 / 1000,
            "top": [(e.key[:70], e.count // 10, round(e.self_device_time_total / 10 / 1000, 4)) for e in top]}


def check(device: torch.device) -> dict:
    """Correctness on this device: the tiny configuration in float32, four text prompts
    joining at different steps and leaving at different lengths, each row's greedy tokens
    against `generate()`'s; eager and compiled (CUDA graphs on CUDA), and each again with
    a 16-column initial cache, so that the cache doubles (and graphs are captured again)
    while rows are running."""
    model = build("tiny", device, torch.float32)
    rng = torch.Generator().manual_seed(1)
    specs = [(torch.randint(3, 300, (1, n), generator=rng), tokens)
             for n, tokens in ((5, 40), (23, 25), (40, 50), (9, 33))]
    eos = main.eos_token_ids(model)
    with torch.inference_mode():
        expected = []
        for prompt, tokens in specs:
            out = model.generate(input_ids=prompt.to(device), attention_mask=torch.ones_like(prompt).to(device),
                                 max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            expected.append(out[0, prompt.shape[1]:].tolist())
        results, initial = {}, main.INITIAL_CACHE_COLUMNS
        for compiled in (False, True):
            for columns in (initial, 16):
                main.INITIAL_CACHE_COLUMNS = columns
                batch = main.Batch()
                batch.prepare(model, 4, compiled)
                rows = []
                for i, (prompt, tokens) in enumerate(specs):
                    prefill = main.Prefill(model, BatchFeature({"input_ids": prompt,
                                                                "attention_mask": torch.ones_like(prompt)}))
                    prefill.run(7)  # chunked, as under load
                    while not prefill.finished:
                        prefill.run(7)
                    row = Row(prefill)
                    row.out, row.tokens = [row.last], tokens
                    batch.join([row], prefill.cache, prefill.length)
                    rows.append(row)
                    greedy(batch, 4 + 3 * i, eos)
                greedy(batch, None, eos)
                name = f"{'compiled' if compiled else 'eager'}, initial cache {columns}"
                results[name] = [row.out == want for row, want in zip(rows, expected)]
                print(f"check {name}: {results[name]} (capacity {batch.cache.capacity}, compiled "
                      f"{batch.step.compiled})", flush=True)
        main.INITIAL_CACHE_COLUMNS = initial
    return results


def greedy(batch: main.Batch, steps: int | None, eos: list[int]) -> None:
    """Greedy steps with EOS banned (as generate's min_new_tokens does) until rows are done."""
    while batch.rows and steps != 0:
        done = set()
        logits = batch.forward().clone()
        logits[:, eos] = float("-inf")
        for row, token in zip(list(batch.rows), logits.argmax(-1).tolist()):
            row.last = token
            row.out.append(token)
            if len(row.out) >= row.tokens:
                done.add(row)
        batch.drop(done)
        steps = None if steps is None else steps - 1


def raw_generate(model, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    ids = prompt.to(device)
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                   do_sample=False)
    sync(device)
    started = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    return steps / (time.perf_counter() - started)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    checked = check(device) if args.check else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model = build(args.config, device, dtype)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "build_s": time.perf_counter() - started,
              "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": args.prompt,
              "steps": args.steps, "bandwidth_bytes_per_s": copy_bandwidth(device), "check": checked}
    vocab = model.config.text_config.vocab_size
    prompt = torch.randint(0, min(vocab, 150000), (1, args.prompt), generator=torch.Generator().manual_seed(0))
    inputs = BatchFeature({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
    sizes = [int(s) for s in args.batch.split(",")]
    with torch.inference_mode():
        prefill = main.Prefill(model, inputs)
        prefill.run(args.prompt)
        result["raw_generate_b1_tokens_per_s"] = raw_generate(model, prompt, min(args.steps, 32), device)
        print(f"bandwidth {result['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, raw generate "
              f"{result['raw_generate_b1_tokens_per_s']:.0f} tok/s", flush=True)
        modes = ([] if args.no_eager else ["eager"]) + ([] if args.no_compile else ["compiled"])
        for mode in modes:
            batch = main.Batch()
            started = time.perf_counter()
            batch.prepare(model, max(sizes), compiled=mode == "compiled")
            warm = time.perf_counter() - started
            if mode == "compiled" and not batch.step.compiled:
                result["compiled_fell_back"] = True
            result[mode] = {"warm_up_s": warm, "capacity": batch.cache.capacity, "runs": []}
            print(f"{mode}: warm-up {warm:.1f} s, capacity {batch.cache.capacity}", flush=True)
            for rows in sizes:
                run_ = decode_rate(batch, prefill, rows, args.steps, device)
                bound_s = step_bytes(model, run_["rows"], run_["columns"]) / result["bandwidth_bytes_per_s"]
                run_["hbm_bound_tokens_per_s"] = run_["rows"] / bound_s
                run_["of_bound"] = run_["tokens_per_s"] / run_["hbm_bound_tokens_per_s"]
                result[mode]["runs"].append(run_)
                print(f"{mode}: {json.dumps(run_)}", flush=True)
            if mode == "compiled" and args.profile and batch.step.graphs_on:
                result["profile"] = profile(batch, prefill)
                print(f"profile: {json.dumps(result['profile'])}", flush=True)
            del batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def table(r: dict) -> str:
    lines = [f"{r['device']}, torch {r['torch']}, {r['config']} config ({r['params'] / 1e9:.2f} B params, "
             f"{r['dtype']}), prompt {r['prompt_tokens']} tokens, {r['steps']} timed steps; copy bandwidth "
             f"{r['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + write).",
             f"Raw `model.generate()` at batch 1: {r['raw_generate_b1_tokens_per_s']:.0f} tok/s.", "",
             "| Mode | Batch | tok/s | ms/step | KV columns read | HBM bound, tok/s | of bound | vs batch 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("eager", "compiled"):
        if mode not in r:
            continue
        base = r[mode]["runs"][0]["tokens_per_s"]
        for run_ in r[mode]["runs"]:
            lines.append(f"| {mode} | {run_['rows']} | {run_['tokens_per_s']:.0f} | {run_['ms_per_step']:.2f} | "
                         f"{run_['columns']} | {run_['hbm_bound_tokens_per_s']:.0f} | {run_['of_bound']:.0%} | "
                         f"{run_['tokens_per_s'] / base:.1f}x |")
        lines.append(f"| {mode} warm-up at load | | {r[mode]['warm_up_s']:.1f} s | | capacity {r[mode]['capacity']} | "
                     "| | |")
    return "\n".join(lines) + "\n"


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["2b", "tiny"], default="2b")
    parser.add_argument("--batch", default="1,8,32", help="comma list of batch sizes")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps per batch size")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--no-eager", action="store_true", help="compiled only")
    parser.add_argument("--static-shapes", action="store_true",
                        help="experiment: compile with dynamic=False (one compile per batch size)")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: kernels per compiled step and GPU time per graph replay, batch 1")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--check", action="store_true",
                        help="first: greedy rows against generate() on the tiny config, eager and compiled")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "gpu.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.static_shapes:
        compile_ = torch.compile
        torch.compile = lambda function, **kwargs: compile_(function, **{**kwargs, "dynamic": False})
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main_()
