"""Step splitters: offsets by hand for lines, paragraphs, "Step k" markers, regex, blank merging and capping."""

from __future__ import annotations

import pytest

from dqo_megatron.process_scores.steps import cap_steps, split_steps, step_texts


def texts(response, **kw):
    ends = split_steps(response, **kw)
    assert ends == sorted(set(ends)) and ends[-1] == len(response) and ends[0] > 0
    assert "".join(step_texts(response, ends)) == response
    return step_texts(response, ends)


def test_lines_keep_blank_lines_with_the_step_before():
    r = "In May she sold 24.\nAltogether 72.\n\n \n#### 72\n"
    assert split_steps(r, "lines") == [20, 38, 46]
    assert texts(r, splitter="lines") == ["In May she sold 24.\n", "Altogether 72.\n\n \n", "#### 72\n"]


def test_leading_and_trailing_blank_text_join_a_real_step():
    assert texts("\n\nabc\n \n", splitter="lines") == ["\n\nabc\n \n"]
    assert texts("a\n\n", splitter="lines") == ["a\n\n"]
    assert texts("   ", splitter="lines") == ["   "]
    assert texts("no breaks at all") == ["no breaks at all"]


def test_paragraphs():
    r = "Let x = 2.\nThen\n$$x^2 = 4$$\n\nSo the answer is \\boxed{4}."
    assert texts(r, splitter="paragraphs") == ["Let x = 2.\nThen\n$$x^2 = 4$$\n\n", "So the answer is \\boxed{4}."]


def test_step_markers_and_auto():
    r = "Intro.\nStep 1: add\nmore\n**Step 2:** times\n### step 3. done\n#### 5"
    want = ["Intro.\n", "Step 1: add\nmore\n", "**Step 2:** times\n", "### step 3. done\n#### 5"]
    assert texts(r, splitter="step_markers") == want
    assert texts(r) == want  # auto: at least two markers
    one = "Step 1: a\nb\nc"
    assert texts(one) == ["Step 1: a\n", "b\n", "c"]  # auto: one marker is not a scheme -> lines
    assert texts("Steps 1 and 2 are\nhere", splitter="step_markers") == ["Steps 1 and 2 are\nhere"]


def test_regex_boundaries_end_of_match_or_lookahead():
    r = "a. b. c"
    assert texts(r, splitter="regex", pattern=r"\. ") == ["a. ", "b. ", "c"]
    assert texts(r, splitter="regex", pattern=r"(?=b)") == ["a. ", "b. c"]
    with pytest.raises(ValueError, match="needs a pattern"):
        split_steps(r, "regex")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        split_steps(r, "regex", "(")
    with pytest.raises(ValueError, match="unknown splitter"):
        split_steps(r, "words")


def test_unicode_offsets_are_code_points():
    r = "日本語 é 😀\nΩ\n"
    assert split_steps(r, "lines") == [len("日本語 é 😀\n"), len(r)] == [8, 10]


def test_cap_steps_balanced_groups():
    assert cap_steps([1, 2, 3, 4, 5, 6, 7], 3) == [3, 5, 7]
    assert cap_steps([1, 2, 3, 4, 5, 6], 3) == [2, 4, 6]
    assert cap_steps([1, 2, 3], 5) == [1, 2, 3]
    r = "".join(f"line {i}\n" for i in range(10))
    assert len(split_steps(r, "lines", max_steps=4)) == 4
    with pytest.raises(ValueError):
        cap_steps([1], 0)
