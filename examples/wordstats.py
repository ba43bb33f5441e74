"""Statistics of one line of text: the function behind the README's first command.

    python -m parmap examples/wordstats.py:stats examples/data/sample.txt

Each line costs a few milliseconds of pure-Python work (the closest pair of
words by edit distance is quadratic in the words and in their letters), so
the run shows real parallel speed-up. Run as a script, it prints one line's
statistics.
"""

from __future__ import annotations

import re
import sys
from itertools import combinations

_WORD = re.compile(r"[A-Za-z']+")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def stats(line: str) -> dict[str, object]:
    """Words, syllables, a Flesch reading-ease score and the two most alike long words of ``line``."""
    words = [w.lower() for w in _WORD.findall(line)]
    syllables = sum(_syllables(w) for w in words)
    sentences = max(1, sum(line.count(mark) for mark in ".!?"))
    reading_ease = None
    if words:
        reading_ease = round(206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words), 1)
    pair, distance = _closest_pair(sorted({w for w in words if len(w) >= 4}))
    return {
        "words": len(words),
        "syllables": syllables,
        "reading_ease": reading_ease,
        "closest_pair": pair,
        "edit_distance": distance,
    }


def _syllables(word: str) -> int:
    count = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and count > 1:
        count -= 1  # a silent final e
    return max(1, count)


def _closest_pair(words: list[str]) -> tuple[list[str] | None, int | None]:
    best: tuple[list[str] | None, int | None] = (None, None)
    for a, b in combinations(words, 2):
        d = _edit_distance(a, b)
        if best[1] is None or d < best[1]:
            best = ([a, b], d)
    return best


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


if __name__ == "__main__":
    print(stats(" ".join(sys.argv[1:]) or "The quick brown fox jumps over the lazy dog."))
