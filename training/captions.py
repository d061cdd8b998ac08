"""Captions of the shape scenes: the training generator, the held-out phrasings, the parser and
the vocabulary.

A caption names the shape ("a red circle"), its position ("in the top left") and, usually, the
background ("on a plain blue background"), in any of the six orders, composed from parts:

- the shape: an article or quantifier ("a", "one", "a single", none), the colour, the shape; a
  caption may open with "there is";
- the position: bare ("top left", "upper left corner", "centre", "left side") or with a
  preposition ("in the top left", "at the center", "on the left", "in the middle of the
  picture"), after a verb ("placed", "located", "sitting", "positioned", "is") or none, "right"
  before the preposition sometimes ("sitting right in the middle");
- the background: "plain"/"solid" or nothing before the colour, "colored"/"coloured" or nothing
  after it, "background" or "backdrop", bare ("blue background") or after "on"/"against"/"with"
  ("on a plain blue backdrop"), or first as "a blue background with a red circle ...";
- parts joined by a comma, a space, or (position first) a colon.

That gives tens of thousands of surface forms per scene. `NO_BACKGROUND_SHARE` of the captions do
not name the background ("orange circle in the middle"): the picture then has some background
of another colour, as a user who leaves it out would expect.

Held-out phrasings. `EVAL_TEMPLATES` are phrasings the generator never produces, so the evaluation
can measure what the model makes of wording it never saw. The generator keeps four rules on
purpose, and every evaluation template breaks at least one (the rules are named after each
template; `tests/training/test_captions.py` checks on 100,000 sampled captions that none
matches any evaluation template):

- R1: a verb is always followed by the position, with a preposition ("placed in the center",
  "sitting right at the top"), never by a bare position ("placed center") or the background
  ("sitting on a blue background");
- R2: "right" before a preposition ("right in the middle") follows a verb, a comma, the
  background or nothing, never the shape word ("circle right in the middle"), where "right"
  would read as the position (it does in "red circle right, blue background");
- R3: "one" and "a single" only when the shape opens the caption (or follows "there is"), never
  after a background or a position;
- R4: the shape never takes "the", and the background never follows "of" ("in the top left of a
  blue background"; "of the picture" is fine).

Every word of an evaluation template is one the generator uses (`vocabulary`): what is new is the
combination, not the words.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# How the vocabulary and the parser split text into words: as the worker splits prompts for its
# out-of-vocabulary warning (schemas/vocabulary.py: WORD_PATTERN, runs of letters of the lowercased text)
from schemas.vocabulary import words_of
from training.shapes import COLOUR_NAMES, POSITIONS, SHAPES, Scene

NO_BACKGROUND_SHARE = 0.1  # share of training captions that leave the background out

# --- the parts ---------------------------------------------------------------------------------
OPENING_ARTICLES = ("a", "one", "a single", "")  # the shape's, when it opens the caption
LATER_ARTICLES = ("a", "")  # the shape's anywhere else (R3)
THERE_IS_SHARE = 0.15  # of captions that open with the shape: "there is a red circle ..."
VERBS = ("placed", "located", "sitting", "positioned", "is")
VERB_SHARE = 0.6  # of positions right after the shape ("a red circle, sitting in the middle")
RIGHT_SHARE = 0.2  # of positions with a preposition, where R2 allows: "right in the middle"
BARE_POSITION_SHARE = 0.4  # of positions not after a verb (R1)
PICTURE_SUFFIXES = ("of the picture", "of the image")
PICTURE_SUFFIX_SHARE = 0.15  # of positions with a preposition
CENTER_WORDS = ("center", "centre", "middle")
VERTICAL_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}  # in corners
CORNER_SHARE = 0.3  # of corner positions: "top left corner"
SIDE_SHARE = 0.3  # of left/right positions: "left side"
# prepositions per kind of position: corners and center, the two sides, top and bottom
PREPOSITIONS = {
    "corner": ("in the", "at the"),
    "center": ("in the", "at the"),
    "side": ("on the", "in the", "at the"),
    "edge": ("at the", "in the"),
}
BACKGROUND_ADJECTIVES = ("plain", "solid", "")  # before the colour
COLOURED_WORDS = ("colored", "coloured")  # after the colour
COLOURED_SHARE = 0.2
BACKGROUND_NOUNS = ("background", "backdrop")
BACKDROP_SHARE = 0.25
BACKGROUND_PREPOSITIONS = ("on", "against", "with")  # "with" only right after the shape
BACKGROUND_ARTICLES = ("a", "")  # "on a blue background", "on blue background"
ORDERS = (
    ("shape", "position", "background"),
    ("shape", "background", "position"),
    ("background", "shape", "position"),
    ("position", "shape", "background"),
    ("background", "position", "shape"),
    ("position", "background", "shape"),
)
SHORT_ORDERS = (("shape", "position"), ("position", "shape"))  # captions without a background
JOINERS = (", ", " ")  # between parts; position first may also take ": "

# --- held-out phrasings ------------------------------------------------------------------------
# {c} shape colour, {s} shape, {b} background colour, {p} the bare position name ("top left",
# "center"; center is spelled center, centre or middle, rotating with the case). After each: the
# rules of the generator it breaks (see the module docstring).
EVAL_TEMPLATES = (
    "on a plain {b} background, one {c} {s} placed {p}",  # R1 R3 (the example)
    "{c} {s} right in the {p} on a {b} background",  # R2 (the "right in the middle")
    "the {c} {s} is {p}, {b} backdrop",  # R1 R4
    "a solid {b} backdrop, a single {c} {s} sitting {p}",  # R1 R3
    "{p}: one {c} {s} against a {b} coloured background",  # R3
    "there is one {c} {s} located right in the {p} of a plain {b} background",  # R4
    "{b} background with one {c} {s} positioned {p}",  # R1 R3
    "one {c} {s} sitting on a {b} background in the {p}",  # R1
)


# The parts draw their random choices from `draw()`, uniform in [0, 1); `describe` takes them from
# one block of UNIFORMS_PER_CAPTION numbers of its rng (a caption uses at most 24).
Draw = Callable[[], float]
UNIFORMS_PER_CAPTION = 32

_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")  # "a orange circle" -> "an orange circle"


def _pick(options: tuple[str, ...], draw: Draw) -> str:
    return options[int(draw() * len(options))]


@dataclass(frozen=True)
class Caption:
    """A generated caption and whether it names the background (the position, colour and shape
    are always named)."""

    text: str
    names_background: bool


def position_name(position: str, draw: Draw) -> str:
    """The words for `position` (a `POSITIONS` name) without a preposition: "top left",
    "upper left corner", "centre", "left side", "top"."""
    if position == "center":
        return _pick(CENTER_WORDS, draw)
    words = position.split()
    if len(words) == 2:  # a corner
        name = f"{_pick(VERTICAL_WORDS[words[0]], draw)} {words[1]}"
        return f"{name} corner" if draw() < CORNER_SHARE else name
    if position in ("left", "right") and draw() < SIDE_SHARE:
        return f"{position} side"
    return position


def _position_kind(position: str) -> str:
    if position == "center":
        return "center"
    if position in ("left", "right"):
        return "side"
    return "corner" if " " in position else "edge"


def position_phrase(position: str, draw: Draw, after_verb: bool = False, intensify: bool = False) -> str:
    """The position part: bare or with a preposition; after a verb always with one (R1); with
    `intensify`, sometimes "right" before "in"/"at" (R2; never "right on the left")."""
    if not after_verb and draw() < BARE_POSITION_SHARE:
        return position_name(position, draw)
    phrase = f"{_pick(PREPOSITIONS[_position_kind(position)], draw)} {position_name(position, draw)}"
    if draw() < PICTURE_SUFFIX_SHARE:
        phrase = f"{phrase} {_pick(PICTURE_SUFFIXES, draw)}"
    if intensify and not phrase.startswith("on ") and draw() < RIGHT_SHARE:
        phrase = f"right {phrase}"
    return phrase


def background_words(colour: str, draw: Draw) -> str:
    """The background without a preposition or article: "plain blue background", "blue coloured
    backdrop", "blue background"."""
    words = [_pick(BACKGROUND_ADJECTIVES, draw), colour]
    if draw() < COLOURED_SHARE:
        words.append(_pick(COLOURED_WORDS, draw))
    words.append(BACKGROUND_NOUNS[draw() < BACKDROP_SHARE])
    return " ".join(w for w in words if w)


def background_phrase(colour: str, draw: Draw, after_shape: bool) -> str:
    """The background part: bare ("blue background") or after "on"/"against" (or "with", right
    after the shape), with "a" or no article."""
    options = BACKGROUND_PREPOSITIONS if after_shape else BACKGROUND_PREPOSITIONS[:2]
    form = int(draw() * (len(options) + 1))
    if form == len(options):
        return background_words(colour, draw)
    article = _pick(BACKGROUND_ARTICLES, draw)
    return " ".join(w for w in (options[form], article, background_words(colour, draw)) if w)


def describe(scene: Scene, rng: np.random.Generator, names_background: bool | None = None) -> Caption:
    """A random caption of `scene` from the generator (never an `EVAL_TEMPLATES` phrasing); it
    names the background as `names_background` says (default: all but `NO_BACKGROUND_SHARE`)."""
    draw = iter(rng.random(UNIFORMS_PER_CAPTION).tolist()).__next__  # one rng call per caption
    if names_background is None:
        names_background = draw() >= NO_BACKGROUND_SHARE
    order = _pick(ORDERS, draw) if names_background else _pick(SHORT_ORDERS, draw)
    joiners: list[str] = []  # before each part ("" before the first)
    parts: list[str] = []
    for slot in order:
        previous = order[len(parts) - 1] if parts else None
        joiner = ""
        if previous == "position" and slot == "shape":
            joiner = _pick((*JOINERS, ": "), draw)
        elif previous is not None:
            joiner = _pick(JOINERS, draw)
        if slot == "shape":
            if not parts:
                words = [_pick(OPENING_ARTICLES, draw)]
                if draw() < THERE_IS_SHARE:
                    words = ["there is", words[0] or "a"]
            elif previous == "background" and joiner == " " and draw() < 0.5:
                # "a plain blue background with a red circle ...": the background as a noun
                parts[-1] = "a " + background_words(scene.background, draw)
                joiner, words = " with ", ["a"]
            else:
                words = [_pick(LATER_ARTICLES, draw)]
            text = " ".join(w for w in (*words, scene.colour, scene.shape) if w)
        elif slot == "position":
            after_verb = previous == "shape" and draw() < VERB_SHARE
            # R2: no "right in the middle" straight after the shape word
            intensify = after_verb or not (previous == "shape" and joiner == " ")
            text = position_phrase(scene.position, draw, after_verb, intensify)
            if after_verb:
                text = f"{_pick(VERBS, draw)} {text}"
        else:
            text = background_phrase(
                scene.background, draw, after_shape=previous == "shape" and joiner == " "
            )
        joiners.append(joiner)
        parts.append(text)
    text = "".join(j + t for j, t in zip(joiners, parts, strict=True))
    return Caption(_A_BEFORE_VOWEL.sub("an ", text), names_background)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of `scene` (its text only; see `describe`)."""
    return describe(scene, rng).text


def eval_caption(template: str, scene: Scene, case_index: int) -> str:
    """`template` (one of `EVAL_TEMPLATES`) filled with `scene`'s words; center is spelled
    center, centre or middle as `case_index` rotates."""
    position = CENTER_WORDS[case_index % len(CENTER_WORDS)] if scene.position == "center" else scene.position
    text = template.format(c=scene.colour, s=scene.shape, p=position, b=scene.background)
    return _A_BEFORE_VOWEL.sub("an ", text)


# --- parsing -----------------------------------------------------------------------------------
_SYNONYMS = {
    "middle": "center",
    "centre": "center",
    "upper": "top",
    "lower": "bottom",
    "backdrop": "background",
}
_BACKGROUND_FILLERS = frozenset(("plain", "solid", *COLOURED_WORDS))
# "right" as an intensifier: followed by "in the"/"at the" ("right in the middle"); as a position
# it is the last word of its phrase ("on the right", "top right corner")
_INTENSIFIER = re.compile(r"\bright (?=(?:in|at) the\b)")


def parse_caption(text: str) -> tuple[str, str, str, str | None]:
    """(colour, shape, position, background) named by a caption of the generator, of an
    `EVAL_TEMPLATES` phrasing or of the earlier fixed templates; background None when the caption
    names none.

    The shape colour is the colour word right before the (one) shape word; the background colour
    the colour word before "background" (or "backdrop"), past "plain", "solid", "colo(u)red";
    the position the longest position name in the caption once synonyms ("middle", "upper"...)
    are mapped and an intensifying "right" ("right in the middle") is dropped. Raises ValueError
    when the caption names no shape, no shape colour or no position.
    """
    normalized = _INTENSIFIER.sub("", " ".join(words_of(text)))
    words = [_SYNONYMS.get(w, w) for w in normalized.split()]
    shape_at = [i for i, w in enumerate(words) if w in SHAPES]
    if len(shape_at) != 1:
        raise ValueError(f"caption {text!r} must name exactly one shape")
    i = shape_at[0]
    if i == 0 or words[i - 1] not in COLOUR_NAMES:
        raise ValueError(f"caption {text!r}: no colour word right before the shape")
    background_at = [k for k, w in enumerate(words) if w == "background"]
    if len(background_at) > 1:
        raise ValueError(f"caption {text!r} names more than one background")
    background = None
    if background_at:
        k = background_at[0] - 1
        while k >= 0 and words[k] in _BACKGROUND_FILLERS:
            k -= 1
        if k < 0 or words[k] not in COLOUR_NAMES:
            raise ValueError(f"caption {text!r}: no colour word before the background")
        background = words[k]
    joined = " " + " ".join(words) + " "
    position = next((p for p in sorted(POSITIONS, key=len, reverse=True) if f" {p} " in joined), None)
    if position is None:
        raise ValueError(f"caption {text!r} names no position")
    return words[i - 1], words[i], position, background


# --- vocabulary --------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """Every word (as `words_of` splits text) the caption generator can produce,
    sorted: the colours, shapes and position words and the fillers of the parts above."""
    phrases = [
        *COLOUR_NAMES,
        *SHAPES,
        *POSITIONS,
        *CENTER_WORDS,
        *(w for words in VERTICAL_WORDS.values() for w in words),
        "corner side there is with an",  # "an" before "orange"
        *OPENING_ARTICLES,
        *LATER_ARTICLES,
        *VERBS,
        "right",
        *PICTURE_SUFFIXES,
        *(p for preps in PREPOSITIONS.values() for p in preps),
        *BACKGROUND_ADJECTIVES,
        *COLOURED_WORDS,
        *BACKGROUND_NOUNS,
        *BACKGROUND_PREPOSITIONS,
        *BACKGROUND_ARTICLES,
    ]
    return sorted({w for phrase in phrases for w in words_of(phrase)})
