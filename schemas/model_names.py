"""What a model's name may be: the one rule shared by requests (`model`), workers (SD_MODEL_NAME, the
name they publish), queue names (schemas/queue.py) and Redis keys.

A name is what clients send and what queues and keys are built from, never a path: letters, digits,
`.`, `_` and `-`, starting with a letter or digit, at most MODEL_NAME_MAX_CHARS characters. So `/`,
`\\`, `:`, spaces and `..` at the start can never reach a key, a queue or a log line.

Depends on the standard library only (the API image has no torch).
"""

from __future__ import annotations

import re

MODEL_NAME_MAX_CHARS = 64
MODEL_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MODEL_NAME_MAX_CHARS - 1}}}$"
MODEL_NAME_RULE = (
    f"letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MODEL_NAME_MAX_CHARS} "
    "characters (no path characters)"
)
_NAME = re.compile(MODEL_NAME_PATTERN)
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]+")


def is_model_name(text: str) -> bool:
    return bool(_NAME.match(text))


def check_model_name(text: str) -> str:
    """`text` if it is a valid model name, else ValueError saying the rule."""
    if not is_model_name(text):
        raise ValueError(f"model name {text[:80]!r} is not valid: {MODEL_NAME_RULE}")
    return text


def model_name_from(text: str) -> str:
    """A valid model name made from a file or folder name (characters outside the rule become `-`,
    leading ones dropped, cut to the length); "model" if nothing is left."""
    name = _NOT_ALLOWED.sub("-", text).lstrip("._-")[:MODEL_NAME_MAX_CHARS].rstrip("._-")
    return name or "model"
