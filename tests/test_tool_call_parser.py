"""The incremental tool-call parser (a text-pipeline stage): fed the same text cut into
pieces at every possible place, it gives the same content, calls and argument text."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from main import (Delta, TextPipeline, ToolCallArguments, ToolCallEnd, ToolCallParser, ToolCallStart, chunk_delta,
                  merge_deltas, merge_tool_call_deltas, piece_delta)

ONE = 'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
PARALLEL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n</tool_call>')
TRICKY = ('Use <b>tags</b> & a <tool_ca text.<tool_call>\n{"name": "echo", "arguments": '
          '{"text": "a \\"quoted\\" </tool_ and {brace} \\\\", "n": null}}\n</tool_call>\nDone.')
SWAPPED = '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>'
BROKEN = 'Hi <tool_call>\nnot json\n</tool_call> bye'
UNCLOSED = 'x<tool_call>\n{"name": "f", "arguments": {"a": [1, 2'
SCALAR = '<tool_call>\n{"name": "f", "arguments": 42}\n</tool_call>'
OUTPUTS = [ONE, PARALLEL, TRICKY, SWAPPED, BROKEN, UNCLOSED, SCALAR]


def ids():
    count = itertools.count()
    return lambda: f"call_{next(count)}"


def merged(pieces: list[tuple[str, object]]) -> list[Delta]:
    """Pieces as the worker posts them, merged as the outbox delivers them."""
    return merge_deltas([piece_delta(kind, value) for kind, value in pieces])


def parse(pieces: list[str]) -> list[Delta]:
    """Feed pieces and flush; runs of content and of one call's argument text are merged
    (how text is cut into events may change with the pieces, the text may not)."""
    parser = ToolCallParser(ids())
    return merged([e for piece in pieces for e in parser.feed(piece)] + parser.flush())


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0, *sorted(set(points)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def content(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if d.kind == "content")


def calls(deltas: list[Delta]) -> list[dict]:
    """message.tool_calls as the chat shaper's chunks add up to."""
    chunks = [chunk_delta(d, ()) for d in deltas if d.kind == "tool_call"]
    return merge_tool_call_deltas([entry for chunk in chunks for entry in chunk.get("tool_calls", [])])


def test_one_call_after_text():
    events = parse([ONE])
    assert content(events) == "Let me check."
    assert calls(events) == [{"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]
    assert isinstance(events[-1].call, ToolCallEnd)


def test_parallel_calls_get_indexes_and_no_content():
    events = parse([PARALLEL])
    assert content(events) == ""
    assert [c["function"]["name"] for c in calls(events)] == ["get_weather", "add"]
    assert calls(events)[1]["function"]["arguments"] == '{"a": 1, "b": [2, {"c": "}"}]}'
    assert [d.call.index for d in events if isinstance(d.call, ToolCallStart)] == [0, 1]


def test_tags_and_braces_inside_strings_and_near_misses_stay_where_they_belong():
    events = parse([TRICKY])
    assert content(events) == "Use <b>tags</b> & a <tool_ca text.Done."
    assert json.loads(calls(events)[0]["function"]["arguments"]) == {"text": 'a "quoted" </tool_ and {brace} \\',
                                                                      "n": None}


def test_arguments_stream_before_the_block_closes():
    parser = ToolCallParser(ids())
    events = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": "long')
    assert [event for _, event in events] == [ToolCallStart(0, "call_0", "f"), ToolCallArguments(0, '{"a": "long')]


def test_keys_in_another_order_parse_at_the_close():
    assert calls(parse([SWAPPED])) == [{"id": "call_0", "type": "function",
                                        "function": {"name": "search", "arguments": '{"q": "x"}'}}]


def test_a_block_that_is_not_a_call_goes_to_content_verbatim():
    assert parse([BROKEN]) == [Delta("content", BROKEN)]


def test_unclosed_call_ends_with_the_generation():
    events = parse([UNCLOSED])
    assert content(events) == "x" and calls(events)[0]["function"]["arguments"] == '{"a": [1, 2'
    assert isinstance(events[-1].call, ToolCallEnd)


def test_scalar_arguments_end_before_the_closing_brace():
    assert calls(parse([SCALAR]))[0]["function"]["arguments"] == "42"


def test_partial_open_tag_at_the_end_is_content():
    assert parse(["see <tool_c"]) == [Delta("content", "see <tool_c")]


def test_chunk_deltas_have_openai_shape():
    assert chunk_delta(piece_delta("tool_call", ToolCallStart(0, "call_0", "f")), ()) == {"tool_calls": [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    assert chunk_delta(piece_delta("tool_call", ToolCallArguments(0, "{}")), ()) == {"tool_calls": [
        {"index": 0, "function": {"arguments": "{}"}}]}
    assert chunk_delta(piece_delta("tool_call", ToolCallEnd(0)), ()) == {}
    assert chunk_delta(Delta("reasoning_content", "hm"), ("reasoning_content", "reasoning")) == {
        "reasoning_content": "hm", "reasoning": "hm"}
    assert chunk_delta(Delta("reasoning_content", "hm"), ()) == {}


def test_argument_text_of_one_call_merges_but_calls_and_choices_stay_apart():
    deltas = [piece_delta("tool_call", ToolCallArguments(0, "{")), piece_delta("tool_call", ToolCallArguments(0, "}")),
              piece_delta("tool_call", ToolCallEnd(0)), piece_delta("tool_call", ToolCallStart(1, "c", "g")),
              piece_delta("tool_call", ToolCallArguments(1, "[")), piece_delta("tool_call", ToolCallArguments(0, "x"), 1)]
    assert [d.call for d in merge_deltas(deltas)] == [ToolCallArguments(0, "{}"), ToolCallEnd(0),
                                                      ToolCallStart(1, "c", "g"), ToolCallArguments(1, "["),
                                                      ToolCallArguments(0, "x")]


@pytest.mark.parametrize("text", OUTPUTS)
def test_every_single_and_double_cut_gives_the_same_result(text):
    whole = parse([text])
    for a in range(1, len(text)):
        assert parse(cut(text, [a])) == whole, a
    for a, b in itertools.combinations(range(1, len(text), 3), 2):
        assert parse(cut(text, [a, b])) == whole, (a, b)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=st.sampled_from(OUTPUTS))
def test_any_split_gives_the_same_result(data, text):
    points = data.draw(st.lists(st.integers(1, len(text) - 1), max_size=len(text)))
    assert parse(cut(text, points)) == parse([text])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_generated_calls_round_trip_under_any_split(data):
    """Arbitrary argument values and surrounding text: the argument deltas add up to the
    JSON as written and the content is exactly the text outside the blocks."""
    value = data.draw(st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8))
    arguments = json.dumps({"v": value}, ensure_ascii=False)
    before = data.draw(st.text(alphabet="ab <>/\n", max_size=10)).strip()
    text = f'{before}\n<tool_call>\n{{"name": "f", "arguments": {arguments}}}\n</tool_call>'
    events = parse(cut(text, data.draw(st.lists(st.integers(1, len(text) - 1), max_size=12))))
    assert calls(events) == [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": arguments}}]
    assert content(events) == before


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_text_without_a_complete_open_tag_passes_through_unchanged(data):
    text = data.draw(st.text(alphabet="<tool_cal>/ \n{}\"xé", min_size=1, max_size=40))
    if "<tool_call>" in text:
        return
    points = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert content(parse(cut(text, points))) == text


def test_pipeline_parses_content_only_never_reasoning():
    """A `<tool_call>` inside the think block is reasoning text; after `</think>` it is a call."""
    raw = "I could write <tool_call> here.</think>\n\n" + PARALLEL
    whole = None
    for a in range(1, len(raw), 5):
        pipeline = TextPipeline([], reasoning=True, tools=True)
        deltas = merged(pipeline.feed(raw[:a]) + pipeline.feed(raw[a:]) + pipeline.flush())
        assert deltas[0] == Delta("reasoning_content", "I could write <tool_call> here.")
        assert content(deltas) == "" and len(calls(deltas)) == 2 and pipeline.called
        whole = whole or deltas
        assert [d for d in deltas if d.kind != "tool_call"] == [d for d in whole if d.kind != "tool_call"]


def test_pipeline_without_tools_leaves_tags_in_the_content():
    pipeline = TextPipeline([], reasoning=False)
    assert merged(pipeline.feed(ONE) + pipeline.flush()) == [Delta("content", ONE)] and not pipeline.called
