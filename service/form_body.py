"""Request bodies that may come as JSON or as multipart/form-data (the routes that take images).

A form sends every value as text, and our request models are strict (schemas/generation.py: "5" is not
an integer in JSON): a form field is read as the JSON value it spells ("30", "7.5", "true", "null"),
except the fields whose type is a string (prompt, sampler, size...), which are taken as they are, so a
prompt "42" stays a prompt. Files are returned apart, as bytes. Errors are FastAPI's 422 shape, located
at the field, so every route reports them as its JSON bodies' errors.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.datastructures import UploadFile

MAX_FORM_FIELDS = 64  # our models have fewer; a form of thousands of parts is not a request of ours


@lru_cache(maxsize=32)
def text_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` whose JSON type is a string (or a string or null)."""
    names = set()
    for name, schema in model.model_json_schema().get("properties", {}).items():
        options = schema.get("anyOf", [schema])
        types = {option.get("type") for option in options} - {"null"}
        if types == {"string"}:
            names.add(name)
    return frozenset(names)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # the model's error names the field and the type it wants


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_body(
    request: Request, model: type[BaseModel], file_fields: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(the body's values, its files by field) from a JSON object or a multipart form; in a form, the
    parts named in `file_fields` are files (a text part there is a 422 naming it), the others values."""
    if not is_form(request):
        return await _json_object(request), {}
    async with request.form(max_files=len(file_fields), max_fields=MAX_FORM_FIELDS) as form:
        values: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        texts = text_fields(model)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in file_fields:
                    raise _invalid(name, f"a file was sent for {name}; files go in {', '.join(file_fields)}")
                files[name] = await value.read()
            elif name in file_fields:
                raise _invalid(name, f"{name} must be a file part (the image file itself)", "file_expected")
            else:
                values[name] = value if name in texts else _json_value(value)
    return values, files


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as error:
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type.lower():
            sent = f"it was {content_type!r}" if content_type else "it had no Content-Type"
            raise _invalid_body(
                f"send JSON (Content-Type: application/json) or multipart/form-data ({sent})"
            ) from None

        position = getattr(error, "pos", 0)
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", position),
                    "msg": "JSON decode error",
                    "ctx": {"error": str(error)},
                }
            ]
        ) from None
    if not isinstance(body, dict):
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object",
                }
            ]
        )
    return body


def _invalid_body(message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": "unsupported_content_type"}])


def _invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])
