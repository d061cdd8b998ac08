"""The GPU worker: RQ slot threads feeding one continuous-batching engine (see workers/main.py),
and the janitor that finds dead workers' jobs (workers/janitor.py).

Importing this package imports nothing heavy: the janitor runs without torch.
"""
