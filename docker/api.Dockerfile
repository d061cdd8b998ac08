# API image: FastAPI + RQ client, no torch (small). Also runs the janitor (workers/janitor.py
# imports no torch), so the service that retries dead workers' jobs is not a GPU worker.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 sdserve
WORKDIR /app

# dependency layer first: cached until the requirements change
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt

COPY schemas/ schemas/
COPY service/ service/
COPY workers/__init__.py workers/janitor.py workers/rq_internals.py workers/redis_outage.py workers/
ENV PYTHONPATH=/app

USER sdserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
