"""Build a tiny, randomly initialised Qwen3-VL "Thinking" checkpoint on local disk.

The Hub is unreachable here, so tests and benchmarks use this instead of
Qwen/Qwen3-VL-2B-Thinking. It has the real architecture (vision tower, M-RoPE,
deepstack), real Qwen3-VL processors, a small BPE tokenizer carrying the Qwen
special tokens, and a chat template (tools included) whose generation prompt ends in
"<think>\\n".

Run as a script to build one: `python tests/tiny_model.py DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Like Qwen's tokenizer: the think tags are added tokens but not special ones, so they
# survive skip_special_tokens=True when the output is decoded.
THINK_TOKENS = ["<think>", "</think>"]

# A reduced Qwen3-VL Thinking template, rendering what Qwen3-VL's Thinking template renders
# (compared with the published template of Qwen3-VL-235B-A22B-Thinking, two copies):
# - tools: the system turn gets the system message, a blank line, then "# Tools" with the
#   function signatures one JSON object a line inside `<tools></tools>`, and the
#   `<tool_call>` instructions;
# - an assistant turn's `tool_calls` become `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
#   blocks, "\n" before each one except a first one with no content before it;
#   `arguments` given as a string (OpenAI clients send a string) are written verbatim;
# - `tool` messages become one user turn per run of consecutive tool messages, each as
#   `\n<tool_response>\n...\n</tool_response>`;
# - assistant turns after the last real user query (the running tool loop) keep their
#   reasoning as `<think>\n...\n</think>\n\n`; earlier ones are rendered without it;
# - the generation prompt always opens `<think>`: there is no `enable_thinking` switch.
# Without tools it renders exactly what the earlier tools-less tiny template rendered
# (tests/test_template.py). Kept from that template instead of Qwen's: content parts as
# {"type": "image" | "video" | "text"}, no "Picture N:" labels. One divergence on purpose:
# `content: null` renders as "" (Qwen's macro fails on None; main.py turns None into ""
# before rendering, for the real template).
CHAT_TEMPLATE_WITH_TOOLS = """\
{%- macro render_content(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{ content }}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>
            {%- elif part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>
            {%- elif part['type'] == 'text' -%}{{ part['text'] }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages[0]['role'] == 'system' -%}{{- render_content(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
        '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0]['role'] == 'system' -%}
    {{- '<|im_start|>system\\n' + render_content(messages[0]['content']) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) -%}
{%- for message in messages[::-1] -%}
    {%- set index = (messages|length - 1) - loop.index0 -%}
    {%- if ns.multi_step_tool and message['role'] == 'user' -%}
        {%- set text = render_content(message['content']) -%}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
            {%- set ns.multi_step_tool = false -%}
            {%- set ns.last_query_index = index -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = render_content(message['content']) -%}
    {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if message['reasoning_content'] is string -%}
            {%- set reasoning = message['reasoning_content'] -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) -%}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}
            {{- content.lstrip('\\n') -}}
        {%- else -%}
            {{- '<|im_start|>assistant\\n' + content -}}
        {%- endif -%}
        {%- for call in message['tool_calls'] or [] -%}
            {%- if not loop.first or content -%}{{- '\\n' -}}{%- endif -%}
            {%- set call = call['function'] if call['function'] is defined else call -%}
            {{- '<tool_call>\\n{"name": "' + call['name'] + '", "arguments": ' -}}
            {%- if call['arguments'] is string -%}{{- call['arguments'] -}}
            {%- else -%}{{- call['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe this image in one sentence. What is in the video?",
    "Hello, how are you today? I am fine, thank you for asking.",
    "Let me think step by step about the answer before I reply.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { }",
    "A red square, a blue circle and a green triangle on a white background.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_tokens(THINK_TOKENS)
    return tokenizer


def build(out_dir: str | Path) -> Path:
    import torch
    from transformers import (
        Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor, Qwen3VLVideoProcessor,
    )

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                             "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config.eos_token_id = ids["<|im_end|>"]
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    relabel_as_think_close(model, tokenizer, ids["</think>"])
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 256 * 32 * 32}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, size=pixels,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(size=pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE_WITH_TOOLS,
    )
    processor.save_pretrained(out)
    return out


THINK_PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n<think>\n"


def relabel_as_think_close(model, tokenizer, close_id: int, step: int = 6) -> None:
    """Make greedy decoding of "Say hello." close the think block mid-answer.

    A random model almost never emits `</think>`. Swapping the embedding and output rows
    of `</think>` with those of the token greedy decoding emits at `step` only renames
    that token, so the same computation now writes reasoning, `</think>`, then content.
    """
    import torch

    prompt = torch.tensor([tokenizer(THINK_PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=step + 1,
                             do_sample=False)
    generated = out[0, prompt.shape[1]:].tolist()
    target = next(t for t in generated[step:] if t not in generated[:step] and t not in tokenizer.all_special_ids)
    for weight in (model.model.language_model.embed_tokens.weight, model.lm_head.weight):
        with torch.no_grad():
            weight[[target, close_id]] = weight[[close_id, target]]


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-qwen3-vl"))
