"""Phrase -> token positions, through the tokenizer (not by splitting on spaces).

The official code split prompts on spaces (docs/official-code.md, "Bugs of the official code we
do not repeat"), which breaks on multi-token words ("teddybear"), punctuation and repeated
words. We tokenize the prompt and each phrase with the pipeline's own tokenizer, after the same
textual-inversion expansion the pipeline applies (`<cute-cat>` -> `<cute-cat> <cute-cat>_1 ...`),
and look for the phrase's ids as a run of whole words in the prompt's ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from compinv.errors import CompinvError

WORD_END = "</w>"


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """Token strings exactly as the text encoder sees them: with BOS, truncated to max length."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


def _word_starts(tokens: list[str], added: set[str]) -> list[bool]:
    """Whether each token begins a word: BPE pieces inside a word lack the `</w>` suffix."""
    starts = [False] * len(tokens)
    for i in range(1, len(tokens)):
        prev = tokens[i - 1]
        starts[i] = i == 1 or prev.endswith(WORD_END) or prev in added or tokens[i] in added
    return starts


def _readable(tokens: list[str]) -> str:
    return " ".join(t.removesuffix(WORD_END) for t in tokens[1:-1])


def phrase_positions(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    phrases: Sequence[str],
    expand: Callable[[str], str] = lambda text: text,
) -> dict[str, list[int]]:
    """Map each phrase to the token positions of its own occurrence in the prompt.

    Longer phrases claim their occurrences first, so in "dog and hot dog" the phrase "hot dog"
    takes the second "dog" and "dog" the first. Each phrase takes its first occurrence not
    claimed by another phrase. `expand` rewrites text the way the pipeline does before encoding
    (diffusers' `maybe_convert_prompt`), so a multi-vector concept maps to all of its vectors.
    """
    tokens = _prompt_tokens(tokenizer, expand(prompt))
    added = set(getattr(tokenizer, "added_tokens_encoder", {})) - {tokens[0], tokens[-1]}
    starts = _word_starts(tokens, added)
    wanted = {p: tokenizer.convert_ids_to_tokens(
        tokenizer(expand(p), add_special_tokens=False).input_ids) for p in phrases}
    claimed: set[int] = set()
    positions: dict[str, list[int]] = {}
    for phrase in sorted(phrases, key=lambda p: -len(wanted[p])):
        pieces = wanted[phrase]
        if not pieces:
            raise CompinvError(f"phrase {phrase!r} is empty; give words of the prompt")
        ends_word = pieces[-1].endswith(WORD_END) or pieces[-1] in added
        found = [i for i in range(1, len(tokens) - len(pieces))
                 if ends_word and starts[i] and tokens[i : i + len(pieces)] == pieces]
        free = [i for i in found if claimed.isdisjoint(range(i, i + len(pieces)))]
        if not free:
            where = ("only inside another phrase" if found else "not")
            raise CompinvError(
                f"phrase {phrase!r} is {where} in the prompt {prompt!r}; the prompt's tokens are: "
                f"{_readable(tokens)}. Use words exactly as they appear in the prompt "
                "(prompts longer than 77 tokens are truncated)")
        positions[phrase] = list(range(free[0], free[0] + len(pieces)))
        claimed.update(positions[phrase])
    return {p: positions[p] for p in phrases}
