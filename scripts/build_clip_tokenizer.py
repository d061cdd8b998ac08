"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's BPE list.

The list ships in the PyPI package open-clip-torch as ``open_clip/bpe_simple_vocab_16e6.txt.gz``.
We derive the Hugging Face files exactly as OpenAI's ``simple_tokenizer.py`` builds its vocabulary:
the 256 byte characters, the same with ``</w>``, the 48,894 merges joined, then the two special
tokens: 49,408 tokens in all.

Usage: python scripts/build_clip_tokenizer.py BPE_GZ OUT_DIR [--pad-token TOKEN]
(pip download --no-deps open-clip-torch; unzip the .gz from the wheel.)
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's simple_tokenizer.py
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build(bpe_gz: Path, out_dir: Path, pad_token: str) -> None:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bpe_gz", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pad-token", default="<|endoftext|>", help='SD 1.x: <|endoftext|>, SD 2.x: "!"')
    args = parser.parse_args()
    build(args.bpe_gz, args.out_dir, args.pad_token)


if __name__ == "__main__":
    main()
