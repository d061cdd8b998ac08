"""A model's closed vocabulary: how text splits into words, and the warning for the words it never saw.

The embedded model learned from captions of a few dozen words and ships them, sorted, in its folder's
`vocabulary.json`; a prompt's other words reach its text encoder but mean nothing to it. Words are
counted as `words_of` splits text (torch-free, so the training code can list its captions' words the
same way). Real checkpoints have no vocabulary file and never warn.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from schemas.generation import Generation

VOCABULARY_FILE = "vocabulary.json"  # in a model folder: a sorted JSON list of its training words

# Runs of ASCII letters of the lowercased text: "A photo, of a CAT!" -> a, photo, of, a, cat.
WORD_PATTERN = r"[a-z]+"
_WORD = re.compile(WORD_PATTERN)

# What a model with a vocabulary file knows: only the embedded model has one, and its captions name
# a shape's colour, kind and place, and the background's colour.
KNOWN_TOPICS = "the embedded model knows colours, shapes, positions and backgrounds"


def words_of(text: str) -> list[str]:
    """The words of `text` as a vocabulary counts them, in order, repeats kept."""
    return _WORD.findall(text.lower())


def unknown_words(text: str, vocabulary: Collection[str]) -> list[str]:
    """The words of `text` not in `vocabulary`, each once, in the order they first appear."""
    return list(dict.fromkeys(word for word in words_of(text) if word not in vocabulary))


def vocabulary_warnings(generation: Generation, vocabulary: Collection[str] | None) -> list[str]:
    """What the job's result says about the words of its prompts the model never saw (none without a
    vocabulary: a real checkpoint's text encoder knows every word)."""
    if vocabulary is None:
        return []
    warnings = []
    for where, text in (("", generation.prompt), (" in the negative prompt", generation.negative_prompt)):
        unknown = unknown_words(text, vocabulary)
        if unknown:
            warnings.append(f"{KNOWN_TOPICS}; ignored{where}: {', '.join(unknown)}")
    return warnings
