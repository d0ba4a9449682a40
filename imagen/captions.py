"""The words prompts are made of: digits as words ("seven") and as numerals ("7")."""

from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_STYLES = ("words", "numerals", "both")


def digit_prompts(style: str) -> list[str]:
    """The distinct prompts of a style: words ("seven"), numerals ("7"), or words then numerals."""
    words, numerals = list(DIGIT_WORDS), [str(digit) for digit in range(10)]
    prompts = {"words": words, "numerals": numerals, "both": words + numerals}
    if style not in prompts:
        raise ValueError(f"prompt style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}.")
    return prompts[style]
