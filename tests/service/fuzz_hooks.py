"""Schemathesis hooks for tests/service/test_fuzz.py (the CLI loads them: SCHEMATHESIS_HOOKS).

A schema cannot say which models a deployment serves: `model` is any valid name, and a request naming
a valid name that no worker serves is rightly refused (422 naming the served ones). So the fuzzer's
schema-valid requests name the model the test's worker serves, or none; schema-violating ones are
left as generated. Nor can it say which LoRAs the model's workers have: schema-valid requests name
none. POST /v1/img2img's schema-valid requests carry real images (a schema cannot say
"a PNG file") and a strength that runs at least one step (a rule across fields).
"""

from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image

from schemas.generation import DEFAULT_STEPS, denoising_steps

SERVED_MODEL = "test-model"  # tests/support/api.py: publish_worker's


def _png(mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (64, 64)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


INIT_IMAGE, MASK_IMAGE = _png("RGB"), _png("L")


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if positive and isinstance(case.body, dict) and case.body.get("model") not in (None, SERVED_MODEL):
        case.body["model"] = SERVED_MODEL
    if positive and isinstance(case.body, dict) and case.body.get("loras"):
        del case.body["loras"]  # the test's worker serves none
    if positive and isinstance(case.body, dict) and "init_image" in case.body:
        case.body["init_image"] = INIT_IMAGE
        if case.body.get("mask_image") is not None:
            case.body["mask_image"] = MASK_IMAGE
        steps = case.body.get("steps")
        steps = int(steps) if isinstance(steps, int | float) else DEFAULT_STEPS
        strength = case.body.get("strength")
        if isinstance(strength, int | float) and denoising_steps(steps, strength) < 1:
            case.body["strength"] = 1.0
    return case
