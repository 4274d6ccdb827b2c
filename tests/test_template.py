"""The tiny checkpoint's template renders tools, tool calls and tool results as Qwen3-VL
Thinking's template does, and renders everything else as the tools-less template did."""

from __future__ import annotations

import json
from functools import lru_cache

from tiny_model import CHAT_TEMPLATE_WITH_TOOLS, build_tokenizer

# The tiny template before tools: kept here to prove that nothing else changed.
PLAIN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_SYSTEM = (
    "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER) + "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n")


@lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer()


def render(messages: list[dict], tools: list[dict] | None = None, template: str = CHAT_TEMPLATE_WITH_TOOLS,
           **kwargs) -> str:
    return tokenizer().apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                           add_generation_prompt=True, **kwargs)


def test_without_tools_it_renders_like_the_tools_less_template():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}]
    assert render(messages) == render(messages, template=PLAIN_TEMPLATE)
    assert render(messages[1:2]) == render(messages[1:2], template=PLAIN_TEMPLATE)


def test_tools_go_into_the_system_turn():
    prompt = render([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Oslo?"}], [WEATHER])
    assert prompt == TOOLS_SYSTEM + "<|im_start|>user\nOslo?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_tools_without_a_system_message_open_the_system_turn_with_tools():
    prompt = render([{"role": "user", "content": "Oslo?"}], [WEATHER])
    assert prompt.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")


def test_a_tool_loop_renders_calls_responses_and_the_running_turns_reasoning():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two cities.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "18 C"}]},
    ]
    assert render(messages, [WEATHER]) == (
        TOOLS_SYSTEM
        + "<|im_start|>user\nWeather in Oslo and Rome?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nTwo cities.\n</think>\n\n"
        + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        + "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response>\n<tool_response>\n18 C\n</tool_response>"
        + "<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_reasoning_of_turns_before_the_last_query_is_dropped():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
                {"role": "user", "content": "Bye"}]
    assert "Greet back" not in render(messages)
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in render(messages)


def test_content_before_a_call_is_separated_by_a_newline():
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]
    assert ('<|im_start|>assistant\n<think>\n\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {}}\n</tool_call><|im_end|>\n') in render(messages, [WEATHER])


def test_generation_prompt_always_opens_think():
    """Qwen3-VL Thinking has no enable_thinking switch; passing it changes nothing."""
    messages = [{"role": "user", "content": "Hi"}]
    plain = render(messages)
    assert plain == render(messages, enable_thinking=False) and plain.endswith("<|im_start|>assistant\n<think>\n")
