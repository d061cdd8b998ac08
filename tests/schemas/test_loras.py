"""LoRAs in a Generation: AUTOMATIC1111's prompt tags read as A1111 reads them, the bounds of `loras`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.generation import Generation
from schemas.loras import LoraRef, format_prompt_tags, split_prompt_tags


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a cat <lora:fur:0.6>, detailed", "a cat , detailed", [{"name": "fur", "weight": 0.6}]),
        ("<lora:a> x <lora:b:-1.5>", " x ", [{"name": "a"}, {"name": "b", "weight": -1.5}]),
        ("no tags <hypernet:h:1>", "no tags <hypernet:h:1>", []),  # other networks' tags stay
    ],
)
def test_tags_leave_the_text_as_a1111_removes_them(prompt: str, text: str, tags: list) -> None:
    assert split_prompt_tags(prompt) == (text, tags)


def test_generation_reads_tags_after_the_field_and_round_trips() -> None:
    generation = Generation(prompt="a cat <lora:fur:0.5>", loras=[{"name": "style", "weight": 2}])
    assert generation.prompt == "a cat "
    assert generation.loras == (LoraRef(name="style", weight=2.0), LoraRef(name="fur", weight=0.5))
    assert Generation.model_validate(generation.model_dump()) == generation  # what a worker re-reads
    assert format_prompt_tags(generation.loras) == "<lora:style:2><lora:fur:0.5>"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loras": [{"name": "../x"}]}, "should match pattern"),
        ({"loras": [{"name": "a/b"}]}, "should match pattern"),
        ({"loras": [{"name": "a", "weight": -4.01}]}, "greater than or equal to -4"),
        ({"loras": [{"name": "a", "weight": "1"}]}, "valid number"),
        ({"prompt": "<lora:a:1:2>"}, "only <lora:name> and <lora:name:weight>"),
        ({"prompt": "<lora:a> <lora:a:2>"}, "named twice"),
        ({"loras": [{"name": f"l{i}"} for i in range(9)]}, "at most 8 items"),
    ],
)
def test_bad_loras_are_refused_with_the_reason(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Generation.model_validate({"prompt": "x", **fields})
