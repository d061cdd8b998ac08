"""schemas/vocabulary.py: how prompts split into words, and the warning for words a model never saw."""

from __future__ import annotations

from schemas.generation import Generation
from schemas.vocabulary import KNOWN_TOPICS, unknown_words, vocabulary_warnings, words_of

VOCABULARY = frozenset({"a", "red", "circle", "in", "the", "top", "left", "on", "blue", "background"})


def generation(prompt: str, negative_prompt: str = "") -> Generation:
    return Generation(prompt=prompt, negative_prompt=negative_prompt, width=64, height=64, seed=1)


def test_words_are_runs_of_letters_of_the_lowercased_text() -> None:
    words = ["a", "photo", "of", "a", "cat", "k", "top", "left"]
    assert words_of("A photo, of a CAT! (4k) top-left") == words


def test_unknown_words_each_once_in_order() -> None:
    assert unknown_words("a photo of a cat, a photo of a red cat", VOCABULARY) == ["photo", "of", "cat"]
    assert unknown_words("A RED circle in the top-left", VOCABULARY) == []


def test_the_warning_names_the_ignored_words() -> None:
    assert vocabulary_warnings(generation("a photo of a cat"), VOCABULARY) == [
        f"{KNOWN_TOPICS}; ignored: photo, of, cat"
    ]
    assert KNOWN_TOPICS == "the embedded model knows colours, shapes, positions and backgrounds"


def test_the_negative_prompt_has_its_own_warning() -> None:
    warnings = vocabulary_warnings(generation("a red circle", "blurry, low quality"), VOCABULARY)
    assert warnings == [f"{KNOWN_TOPICS}; ignored in the negative prompt: blurry, low, quality"]


def test_no_warning_for_known_words_or_a_model_without_a_vocabulary() -> None:
    known = generation("a red circle in the top left on a blue background")
    assert vocabulary_warnings(known, VOCABULARY) == []
    assert vocabulary_warnings(generation("a photo of a cat"), None) == []  # a real checkpoint
