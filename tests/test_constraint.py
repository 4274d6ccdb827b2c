"""Constrained decoding on the tiny tokenizer: grammar compilation and its cache, the
per-row constraint, and the reasoning budget (main.py's "constrained decoding" section)."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

import main
from main import ConstraintViolation, GrammarCompiler, GrammarError, ReasoningBudget, RowConstraint, force_token
from tiny_model import build_tokenizer

EOS, CLOSE = "<|im_end|>", "</think>"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer()


def token_id(text: str) -> int:
    return tokenizer().convert_tokens_to_ids(text)


def encode(text: str) -> list[int]:
    return tokenizer()(text)["input_ids"]


def compiler(vocab_size: int | None = None) -> GrammarCompiler:
    return GrammarCompiler(tokenizer(), vocab_size or len(tokenizer()), [token_id(EOS)])


def request(**fields) -> main.ChatCompletionRequest:
    return main.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def allowed(scores: torch.Tensor) -> set[int]:
    return set(torch.nonzero(scores > float("-inf")).flatten().tolist())


def accepts(grammar, text: str) -> bool:
    """The grammar takes text (as the tokenizer splits it) and may end there."""
    row = RowConstraint(grammar, None, [token_id(EOS)])
    try:
        for token in encode(text):
            row.advance(token)
    except ConstraintViolation:
        return False
    return row.matcher.is_accepting()


@pytest.fixture(scope="module")
def grammars() -> GrammarCompiler:
    return compiler()


def test_same_schema_compiles_once(grammars):
    first = grammars.for_request(request(response_format=json_schema(PERSON)))
    again = grammars.for_request(request(response_format=json.loads(json.dumps(json_schema(PERSON), indent=4))))
    assert again is first


def test_property_order_is_part_of_the_cache_key(grammars):
    """llguidance makes the model write keys in schema order, so reordered properties are another grammar."""
    reordered = {**PERSON, "properties": {"age": PERSON["properties"]["age"], "name": PERSON["properties"]["name"]}}
    first = grammars.for_request(request(response_format=json_schema(PERSON)))
    second = grammars.for_request(request(response_format=json_schema(reordered)))
    assert first is not second
    assert accepts(first, '{"name": "Al", "age": 3}') and not accepts(first, '{"age": 3, "name": "Al"}')
    assert accepts(second, '{"age": 3, "name": "Al"}')


@pytest.mark.parametrize("schema", [{"type": "strin"}, {"$ref": "#/$defs/missing"},
                                    {"type": "string", "pattern": "(?<=a)b"}])
def test_a_schema_the_library_cannot_compile_is_a_grammar_error_naming_response_format(grammars, schema):
    with pytest.raises(GrammarError) as caught:
        grammars.for_request(request(response_format=json_schema(schema)))
    assert caught.value.param == "response_format" and "\n" not in caught.value.message
    assert "x-guidance" not in caught.value.message  # our grammar text is not the client's business


def test_tool_parameters_the_library_cannot_compile_name_tools(grammars):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
    with pytest.raises(GrammarError) as caught:
        grammars.for_request(request(tools=[bad], tool_choice="required"))
    assert caught.value.param == "tools"
    with pytest.raises(GrammarError) as caught:  # with tool_choice auto the calls are one alternative
        grammars.for_request(request(tools=[bad], response_format={"type": "json_object"}))
    assert caught.value.param == "tools"


def test_text_auto_tools_and_none_need_no_grammar(grammars):
    for req in (request(), request(response_format={"type": "text"}, tools=[WEATHER], tool_choice="auto"),
                request(tools=[WEATHER], tool_choice="none")):
        assert not main.needs_grammar(req) and grammars.for_request(req) is None


def test_json_object_takes_any_object_after_qwens_blank_lines(grammars):
    grammar = grammars.for_request(request(response_format={"type": "json_object"}))
    assert accepts(grammar, '\n\n{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(grammar, "[1, 2]")
    assert not accepts(grammar, "Sure! {}")


def test_strict_false_is_enforced_too(grammars):
    loose = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": False}}
    assert not accepts(grammars.for_request(request(response_format=loose)), '{"name": "Al"}')


def test_json_whitespace_is_bounded(grammars):
    grammar = grammars.for_request(request(response_format={"type": "json_object"}))
    assert accepts(grammar, '{\n    "a": 1\n}')
    assert not accepts(grammar, "{" + " " * 21 + '"a": 1}')


def test_forced_tool_call_takes_qwens_format_only(grammars):
    grammar = grammars.for_request(request(tools=[WEATHER, ADD],
                                           tool_choice={"type": "function", "function": {"name": "add"}}))
    assert accepts(grammar, "\n\n" + ADD_CALL)
    assert not accepts(grammar, WEATHER_CALL)
    assert not accepts(grammar, '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>')
    assert not accepts(grammar, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert not accepts(grammar, ADD_CALL + "\n" + ADD_CALL)  # named: exactly one call


def test_required_tool_choice_allows_parallel_calls_unless_disabled(grammars):
    two = WEATHER_CALL + "\n" + ADD_CALL
    assert accepts(grammars.for_request(request(tools=[WEATHER, ADD], tool_choice="required")), two)
    single = grammars.for_request(request(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False))
    assert not accepts(single, two) and accepts(single, WEATHER_CALL)


def test_a_forced_call_wins_over_response_format(grammars):
    grammar = grammars.for_request(request(tools=[ADD], tool_choice="required", response_format={"type": "json_object"}))
    assert accepts(grammar, ADD_CALL) and not accepts(grammar, "{}")


def test_with_auto_tools_a_json_answer_may_be_calls_instead(grammars):
    grammar = grammars.for_request(request(tools=[WEATHER, ADD], response_format=json_schema(PERSON)))
    assert accepts(grammar, '{"name": "Al", "age": 3}')
    assert accepts(grammar, "\n\n" + ADD_CALL)
    assert not accepts(grammar, "Hello")


def test_after_a_call_the_model_may_stop_or_call_again(grammars):
    row = RowConstraint(grammars.for_request(request(tools=[WEATHER, ADD], tool_choice="required")), None,
                        [token_id(EOS)])
    for token in encode(ADD_CALL):
        row.advance(token)
    scores = torch.zeros(len(tokenizer()))
    row.mask(scores)
    assert {token_id(EOS), encode("\n")[0]} <= allowed(scores)


def test_function_without_parameters_takes_empty_arguments(grammars):
    grammar = grammars.for_request(request(tools=[{"type": "function", "function": {"name": "now"}}],
                                           tool_choice="required"))
    assert accepts(grammar, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert not accepts(grammar, '<tool_call>\n{"name": "now", "arguments": {"x": 1}}\n</tool_call>')


def test_constraint_waits_for_the_think_block_to_close(grammars):
    """Reasoning is free text (EOS banned: the answer must still come); the grammar starts after </think>."""
    row = RowConstraint(grammars.for_request(request(response_format=json_schema(PERSON))), token_id(CLOSE),
                        [token_id(EOS)])
    vocab = len(tokenizer())
    for token in encode("Let me think"):
        assert not row.active
        scores = torch.zeros(vocab)
        row.mask(scores)
        assert allowed(scores) == set(range(vocab)) - {token_id(EOS)}
        row.advance(token)
    row.advance(token_id(CLOSE))
    assert row.active
    scores = torch.zeros(vocab)
    row.mask(scores)
    assert token_id("{") in allowed(scores) and token_id("a") not in allowed(scores)
    assert token_id(CLOSE) not in allowed(scores)  # added tokens never go into the answer


def test_mask_bans_logits_past_the_tokenizer():
    """The model's logits are wider than the tokenizer (151,936 vs 151,669 for Qwen3-VL)."""
    width = len(tokenizer()) + 45
    row = RowConstraint(compiler(width).for_request(request(response_format={"type": "json_object"})), None,
                        [token_id(EOS)])
    scores = torch.zeros(width)
    row.mask(scores)
    assert allowed(scores) and max(allowed(scores)) < len(tokenizer())


def test_complete_answer_leaves_only_eos(grammars):
    row = RowConstraint(grammars.for_request(request(response_format=json_schema(PERSON))), token_id(CLOSE),
                        [token_id(EOS)])
    for token in [token_id(CLOSE), *encode('{"name": "Al", "age": 30}')]:
        row.advance(token)
    scores = torch.zeros(len(tokenizer()))
    row.mask(scores)
    assert allowed(scores) == {token_id(EOS)}


def test_mask_keeps_the_dtype_of_half_precision_logits(grammars):
    row = RowConstraint(grammars.for_request(request(response_format={"type": "json_object"})), None,
                        [token_id(EOS)])
    scores = torch.zeros(len(tokenizer()), dtype=torch.bfloat16)
    row.mask(scores)
    assert scores.dtype == torch.bfloat16 and token_id("{") in allowed(scores)


def test_refused_token_raises_at_once(grammars):
    row = RowConstraint(grammars.for_request(request(response_format=json_schema(PERSON))), None, [token_id(EOS)])
    with pytest.raises(ConstraintViolation):
        row.advance(encode("x")[0])


def test_force_token_leaves_one_candidate():
    scores = torch.randn(10)
    force_token(scores, 7)
    assert allowed(scores) == {7} and scores.argmax() == 7


def test_reasoning_budget_forces_think_close_after_the_limit():
    budget = ReasoningBudget(3, token_id(CLOSE))
    for token in encode("abc"):
        scores = torch.zeros(len(tokenizer()))
        budget.mask(scores)
        assert len(allowed(scores)) == len(tokenizer())
        budget.advance(token)
    scores = torch.zeros(len(tokenizer()))
    budget.mask(scores)
    assert allowed(scores) == {token_id(CLOSE)}
    budget.advance(token_id(CLOSE))
    assert budget.spent == 4 and not budget.open


def test_reasoning_budget_zero_skips_thinking():
    scores = torch.zeros(len(tokenizer()))
    ReasoningBudget(0, token_id(CLOSE)).mask(scores)
    assert allowed(scores) == {token_id(CLOSE)}


def test_reasoning_budget_counts_an_early_close_and_then_stays_out_of_the_way():
    budget = ReasoningBudget(5, token_id(CLOSE))
    for token in [encode("a")[0], token_id(CLOSE), *encode("hello world")]:
        budget.advance(token)
    scores = torch.zeros(len(tokenizer()))
    budget.mask(scores)
    assert budget.spent == 2 and len(allowed(scores)) == len(tokenizer())


@pytest.mark.parametrize("effort, budget", [(None, None), ("none", 0), ("low", 256), ("medium", 1024),
                                            ("high", 4096), ("max", None)])
def test_reasoning_effort_maps_to_a_documented_budget(effort, budget):
    assert main.reasoning_budget(request(reasoning_effort=effort)) == budget
    assert main.reasoning_budget(request(reasoning_effort=effort, max_reasoning_tokens=7)) == 7
