"""The words prompts are made of: digits as words ("seven") and as numerals ("7"), and how a
prompt is normalised before the text encoder reads it."""

from __future__ import annotations

import unicodedata

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_STYLES = ("words", "numerals", "both")


def digit_prompts(style: str) -> list[str]:
    """The distinct prompts of a style: words ("seven"), numerals ("7"), or words then numerals."""
    words, numerals = list(DIGIT_WORDS), [str(digit) for digit in range(10)]
    prompts = {"words": words, "numerals": numerals, "both": words + numerals}
    if style not in prompts:
        raise ValueError(f"prompt style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}.")
    return prompts[style]


NORMALIZATIONS = ("none", "spacing", "plain")


def normalize_prompt(prompt: str, mode: str) -> str:
    """A prompt as the text encoder reads it (``text_encoder.normalize``).

    ``none`` leaves it as typed. ``spacing`` applies Unicode NFKC and collapses runs of
    whitespace into single spaces, trimming both ends. ``plain`` also lowercases and turns
    punctuation into spaces: "  SEVEN. " and "Seven!" both read "seven", which is what a
    tokenizer without pretraining (the offline tiny T5) needs to treat them alike.
    """
    if mode == "none":
        return prompt
    if mode not in NORMALIZATIONS:
        raise ValueError(f"prompt normalization: expected one of {', '.join(NORMALIZATIONS)}, got {mode!r}.")
    text = unicodedata.normalize("NFKC", prompt)
    if mode == "plain":
        text = "".join(char if char.isalnum() or char.isspace() else " " for char in text.lower())
    return " ".join(text.split())


def shorten(prompt: str, limit: int = 60) -> str:
    """A prompt as messages quote it: whole up to ``limit`` characters, else cut with its length."""
    if len(prompt) <= limit:
        return repr(prompt)
    return f"{prompt[:limit]!r}... ({len(prompt)} characters)"
