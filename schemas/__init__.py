"""The contract between service/ and workers/: job payloads, results and Redis key names.

Depends on pydantic only, so the API image stays free of torch.
"""
