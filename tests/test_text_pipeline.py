"""Pure-function tests of the text pipeline: stop strings and the reasoning split,
fed the same text cut into pieces at every possible place."""

import random

import pytest

from main import ReasoningSplitter, StopMatcher, TextPipeline, partial_suffix


def feed_pieces(pipeline: TextPipeline, pieces: list[str]) -> dict[str, str]:
    out = {"reasoning_content": "", "content": ""}
    for piece in pieces:
        for name, text in pipeline.feed(piece):
            out[name] += text
    for name, text in pipeline.flush():
        out[name] += text
    return out


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(8, len(text) - 1)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def expected(raw: str, stops: list[str], opens_think: bool) -> dict[str, str]:
    """The reference answer computed on the whole text at once."""
    hits = [raw.find(s) for s in stops if s in raw]
    text = raw[:min(hits)] if hits else raw
    if opens_think:
        head, sep, tail = text.partition("</think>")
        return {"reasoning_content": head, "content": tail} if sep else {"reasoning_content": text, "content": ""}
    if text.startswith("<think>"):
        head, sep, tail = text[len("<think>"):].partition("</think>")
        return {"reasoning_content": head, "content": tail} if sep else {"reasoning_content": head, "content": ""}
    return {"reasoning_content": "", "content": text}


CASES = [
    ("Let me think.\n</think>\n\nThe answer is 4.", [], True),
    ("short</think>answer", [], True),
    ("no close tag at all, still thinking", [], True),
    ("</think>only content", [], True),
    ("reason</think>content with </think> inside", [], True),
    ("plain answer from a non-thinking template", [], False),
    ("<think>opened by the model</think>answer", [], False),
    ("thinking STOP more</think>answer", ["STOP"], True),
    ("thinking</think>answer STOP tail", ["STOP"], True),
    ("thinking ST</think>OP", ["STOP"], True),
    ("stop inside reasoning x</think> and after", ["x</think>"], True),
    ("aaa bbb ccc", ["bbb", "aa"], True),
    ("multi stop: foo bar baz", ["baz", "bar"], False),
    ("partial stops that never complete: STO ST S", ["STOP"], False),
]


@pytest.mark.parametrize("raw,stops,opens_think", CASES)
def test_pipeline_output_does_not_depend_on_how_text_is_split(raw, stops, opens_think):
    rng = random.Random(raw)
    want = expected(raw, stops, opens_think)
    for _ in range(200):
        got = feed_pieces(TextPipeline(stops, opens_think), random_pieces(raw, rng))
        assert got == want


def test_pipeline_fed_one_character_at_a_time_matches_whole_text():
    raw = "a</think>b</think>c"
    got = feed_pieces(TextPipeline([], True), list(raw))
    assert got == {"reasoning_content": "a", "content": "b</think>c"}


def test_think_tag_never_appears_when_split_across_pieces():
    got = feed_pieces(TextPipeline([], True), ["reasoning </", "thi", "nk", ">", " answer"])
    assert got == {"reasoning_content": "reasoning ", "content": " answer"}


def test_stop_match_drops_the_rest_of_the_piece_including_a_later_think_close():
    pipeline = TextPipeline(["END"], True)
    assert pipeline.feed("thinking END more</think>answer") == [("reasoning_content", "thinking ")]
    assert pipeline.stop.stopped
    assert pipeline.feed("later text") == []
    assert pipeline.flush() == []


def test_stop_matcher_holds_back_only_possible_stop_prefixes():
    matcher = StopMatcher(["hello"])
    assert matcher.feed("say hel") == "say "
    assert matcher.feed("p") == "help"
    assert matcher.feed("ful hell") == "ful "
    assert matcher.feed("o world") == ""
    assert matcher.stopped


def test_reasoning_splitter_without_open_block_streams_plain_content():
    splitter = ReasoningSplitter(reasoning=False)
    assert splitter.feed("Hello ") == [("content", "Hello ")]
    assert splitter.feed("<think>not a block once content began") == [
        ("content", "<think>not a block once content began")]


def test_partial_suffix_finds_longest_tag_prefix():
    assert partial_suffix("abc</th", "</think>") == 4
    assert partial_suffix("abc", "</think>") == 0
    assert partial_suffix("<", "</think>") == 1
    assert partial_suffix("</think>", "</think>") == 0
