"""Checks of a norm's options: user input, so a ValueError naming the key, the value and what
is valid (the CLIs turn it into one line)."""

import math


def check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")


def check_float(key: str, value, low: float, high: float = math.inf, open_low=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (value > low if open_low else value >= low) or value > high:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        raise ValueError(f"{key}={value!r}: must be a number {bound}{upper}")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: must be true or false")


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: valid choices: {', '.join(choices)}")
