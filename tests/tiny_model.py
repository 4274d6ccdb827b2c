"""Build a tiny, randomly initialised Qwen3-VL "Thinking" checkpoint on local disk.

The Hub is unreachable here, so tests and benchmarks use this instead of
Qwen/Qwen3-VL-2B-Thinking. It has the real architecture (vision tower, M-RoPE,
deepstack), real Qwen3-VL processors, a small BPE tokenizer carrying the Qwen
special tokens, and a chat template whose generation prompt ends in "<think>\\n".

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

# A reduced Qwen3-VL Thinking template: system/user/assistant turns, image and video
# parts as vision placeholders, and a generation prompt that opens the think block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)

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
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
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
