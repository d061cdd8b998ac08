"""Command-line client of the service: `sd-txt2img "a prompt" --out picture.png` (see client/cli.py).

Talks HTTP only (httpx): no torch, no Redis, nothing of the service's code.
"""
