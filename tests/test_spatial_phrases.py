"""Phrase -> token positions through the tokenizer (issue B item 4)."""

from __future__ import annotations

import pytest

from compinv.errors import CompinvError
from compinv.models import build_tiny_pipeline
from compinv.spatial.phrases import phrase_positions
from compinv.tokens import add_concept_token, single_token_id


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline()
    cat = single_token_id(pipe.tokenizer, "cat", "--init-word")
    add_concept_token(pipe.tokenizer, pipe.text_encoder, "<cute-cat>", 3, cat)
    return pipe


def positions(pipe, prompt, phrases):
    return phrase_positions(pipe.tokenizer, prompt, phrases,
                            expand=lambda text: pipe.maybe_convert_prompt(text, pipe.tokenizer))


# Position 0 is the start token; "teddybear" is "teddy" + "bear</w>", "hydrant" "hydr" + "ant</w>".
CASES = [
    ("a photo of a cat", ["cat"], {"cat": [5]}),
    ("a teddybear and a hydrant", ["teddybear", "hydrant"], {"teddybear": [2, 3], "hydrant": [6, 7]}),
    ("dog and hot dog", ["dog", "hot dog"], {"dog": [1], "hot dog": [3, 4]}),
    ("dog and hot dog", ["hot dog", "dog"], {"hot dog": [3, 4], "dog": [1]}),
    ("a <cute-cat> and a backpack", ["<cute-cat>", "backpack"], {"<cute-cat>": [2, 3, 4], "backpack": [7]}),
    ("a photo of <cute-cat>", ["photo of <cute-cat>"], {"photo of <cute-cat>": [2, 3, 4, 5, 6]}),
    ("a cat, a dog.", ["dog", "cat,"], {"dog": [5], "cat,": [2, 3]}),
    ("A Cat and a BACKPACK", ["cat", "Backpack"], {"cat": [2], "Backpack": [5]}),
    ("a bear and a teddybear", ["bear", "teddybear"], {"bear": [2], "teddybear": [5, 6]}),
    ("a cat and a cat", ["cat"], {"cat": [2]}),
]


@pytest.mark.parametrize("prompt,phrases,expected", CASES)
def test_phrase_positions_table(pipe, prompt, phrases, expected):
    assert positions(pipe, prompt, phrases) == expected


@pytest.mark.parametrize("prompt,phrase", [
    ("a teddybear", "bear"),          # a piece of a word is not the word
    ("a cat and a backpack", "dog"),  # absent
    ("a photo of a cats", "cat"),     # a different word
])
def test_phrase_not_in_prompt_lists_the_tokens(pipe, prompt, phrase):
    with pytest.raises(CompinvError) as info:
        positions(pipe, prompt, [phrase])
    message = str(info.value)
    assert repr(phrase) in message and "tokens are:" in message
    assert prompt.split()[-1][:4] in message  # the prompt's tokens are listed


def test_phrase_only_inside_a_longer_phrase_is_an_error(pipe):
    with pytest.raises(CompinvError, match="only inside another phrase"):
        positions(pipe, "a hot dog", ["dog", "hot dog"])
