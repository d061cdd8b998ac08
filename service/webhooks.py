"""Webhooks: when a job submitted with `webhook_url` ends (succeeded, failed, canceled), POST its
document (the JSON of GET /v1/jobs/{id}) to that URL, signed, retried, once.

Who delivers: every API process runs a `WebhookDeliverer`, a task of its event loop started by the
app's lifespan (service/app.py), when SD_WEBHOOK_ALLOWED_HOSTS enables webhooks. Not the GPU worker
(it must not wait on somebody's slow server, and it should hold no secret), and not the janitor (a
synchronous loop of blocking sweeps, optional in some deployments): the API already holds the
settings that checked the URL at submission, the secret, and the code that makes the job document.

State, all in Redis, so a delivery survives the restart of any API process:
- WEBHOOKS_PENDING_ZSET: the jobs with a webhook to deliver, scored by when to look at each next.
  The submission adds the job in the transaction that enqueues it; the URL is in the job's meta
  (a delivery option, never in the Generation the worker sees).
- Each API process sweeps the due entries every SWEEP_S: one pipelined HGET of their RQ statuses;
  a job not ended yet is looked at again CHECK_AGAIN_S later; an ended one is CLAIMED by an atomic
  script (due -> leased until now + timeout + LEASE_MARGIN_S): exactly one process gets each
  attempt. Success (any 2xx) removes the entry; a failure schedules the next attempt (backoff
  BACKOFF_FIRST_S doubling up to BACKOFF_MAX_S) until SD_WEBHOOK_RETRY_FOR_S after the first
  attempt, then the webhook is dropped and logged. A process that dies mid-attempt leaves its
  lease to expire, and another process tries again: at most one extra delivery, in that case only
  (receivers dedupe on the `Sd-Webhook-Id` header).

Each attempt: the URL checked again (service/webhook_url.py: allowed host, every resolved address
public unless the host is named explicitly), then a POST to one of the checked addresses (the name
is not resolved twice; TLS still verifies the name), no redirect followed, no connection reused,
the answer's body never read, the whole attempt bounded by SD_WEBHOOK_TIMEOUT_S. Nothing of it
holds a request or a thread; the job document is built in a worker thread (RQ is synchronous).

Signature (README: Webhooks): `Sd-Webhook-Signature: v1=<hex HMAC-SHA256(SD_WEBHOOK_SECRET,
"<Sd-Webhook-Timestamp>.<body>")>`, with `Sd-Webhook-Timestamp` the attempt's unix time in seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import httpx
import redis.asyncio
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from rq.job import Job

from schemas.redis_keys import WEBHOOKS_PENDING_ZSET, webhook_attempts_key
from service.deps import Services
from service.errors import validation_error
from service.job_status import TERMINAL
from service.job_wait import ENDED as RQ_ENDED
from service.routes.jobs import count_if_first_seen_finished, job_view
from service.settings import Settings
from service.webhook_url import Target, WebhookRefused, check, check_sync

log = logging.getLogger(__name__)

SWEEP_S = 0.5
CHECK_AGAIN_S = 0.5  # a job with a webhook that has not ended is looked at again after this long
SWEEP_BATCH = 200  # due entries read per sweep
MAX_IN_FLIGHT = 16  # attempts running at once in one process
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
LEASE_MARGIN_S = 10.0  # a claim outlives the attempt's timeout by this much

SIGNATURE_VERSION = "v1"
HEADER_ID = "Sd-Webhook-Id"
HEADER_TIMESTAMP = "Sd-Webhook-Timestamp"
HEADER_SIGNATURE = "Sd-Webhook-Signature"
HEADER_ATTEMPT = "Sd-Webhook-Attempt"
USER_AGENT = "sdserve-webhooks/1"

# Claim a due entry: if its score (when to look at it) has come, lease it (score = lease end).
CLAIM_SCRIPT = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


def check_submission(url: str, settings: Settings) -> None:
    """At submission (thread pool): every rule of service/webhook_url.py, or a 422 on `webhook_url`."""
    try:
        check_sync(url, settings.webhook_allowed_hosts)
    except WebhookRefused as error:
        raise _invalid(str(error)) from None


def _invalid(message: str) -> RequestValidationError:
    return validation_error("webhook_url", message, "webhook_url")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: `v1=` and the hex HMAC-SHA256 of "<timestamp>.<body>"."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def backoff_s(attempt: int) -> float:
    """Wait after failed attempt number `attempt` (1, 2, ...): 1 s, 2 s, 4 s ... up to BACKOFF_MAX_S."""
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


class NotEndedYet(Exception):
    """The job went back to the queue (a retry) between the sweep that saw it end and its attempt."""


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    body: bytes  # the job document, as GET /v1/jobs/{id} answers it


class WebhookDeliverer:
    """One per API process (app lifespan): `run()` sweeps until cancelled, `close()` ends it."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.redis: redis.asyncio.Redis = services.redis.aio
        # No pooled connection: a connection made to an address for one host name must not serve another.
        self.http = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the addresses checked are the ones reached
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": USER_AGENT},
        )
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._redis_trouble = False

    async def run(self) -> None:
        log.info("webhooks on: hosts %s", ", ".join(self.settings.webhook_allowed_hosts))
        while True:
            try:
                await self.sweep()
                if self._redis_trouble:
                    log.info("webhooks: Redis answers again")
                    self._redis_trouble = False
            except RedisError as error:
                if not self._redis_trouble:
                    log.warning("webhooks: Redis failed (%s); deliveries wait until it answers", error)
                    self._redis_trouble = True
            except Exception:
                log.exception("webhooks: unexpected error in a sweep")
            await asyncio.sleep(SWEEP_S)

    async def close(self) -> None:
        """Cancel the attempts in flight (their leases expire: another process, or this one restarted,
        tries again) and close the HTTP client."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.http.aclose()

    async def sweep(self) -> None:
        """Look at the due entries: reschedule the unfinished, drop the expired, claim the ended."""
        now = time.time()
        due = await self.redis.zrangebyscore(WEBHOOKS_PENDING_ZSET, "-inf", now, start=0, num=SWEEP_BATCH)
        job_ids = [_text(raw) for raw in due if _text(raw) not in self._in_flight]
        if not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = await pipe.execute()
        waiting, ended = {}, []
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None:
                log.warning("webhook of job %s dropped: the job expired or was deleted first", job_id)
                await self.redis.zrem(WEBHOOKS_PENDING_ZSET, job_id)
            elif _text(status) in RQ_ENDED:
                ended.append(job_id)
            else:
                waiting[job_id] = now + CHECK_AGAIN_S
        if waiting:
            # gt: never shorten a lease another process took meanwhile
            await self.redis.zadd(WEBHOOKS_PENDING_ZSET, waiting, xx=True, gt=True)
        lease_s = self.settings.webhook_timeout_s + LEASE_MARGIN_S
        for job_id in ended:
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                break
            if await self._claim(keys=[WEBHOOKS_PENDING_ZSET], args=[job_id, now, now + lease_s]):
                task = asyncio.create_task(self._deliver(job_id), name=f"webhook-{job_id}")
                self._in_flight[job_id] = task
                task.add_done_callback(lambda _, job_id=job_id: self._in_flight.pop(job_id, None))

    async def _deliver(self, job_id: str) -> None:
        """One claimed attempt, and what follows from it (done, dropped, or scheduled again)."""
        try:
            delivery = await asyncio.to_thread(self._delivery, job_id)
            if delivery is None:
                log.warning("webhook of job %s dropped: the job expired, or has no webhook_url", job_id)
                await self._forget(job_id)
                return
            attempt, first_at = await self._count_attempt(job_id)
            try:
                async with asyncio.timeout(self.settings.webhook_timeout_s):
                    target = await check(delivery.url, self.settings.webhook_allowed_hosts)
                    status = await self._post(target, delivery, attempt)
                if 200 <= status < 300:
                    log.info("webhook of job %s delivered (attempt %d, HTTP %d)", job_id, attempt, status)
                    await self._forget(job_id)
                    return
                reason = f"the receiver answered HTTP {status}"
            except WebhookRefused as error:
                log.warning("webhook of job %s dropped: %s", job_id, error)
                await self._forget(job_id)
                return
            except TimeoutError:
                reason = f"no answer within {self.settings.webhook_timeout_s:g} s (SD_WEBHOOK_TIMEOUT_S)"
            except (httpx.HTTPError, OSError) as error:
                reason = f"{type(error).__name__}: {error}"
            await self._retry_or_drop(job_id, attempt, first_at, reason)
        except NotEndedYet:
            await self.redis.zadd(WEBHOOKS_PENDING_ZSET, {job_id: time.time() + CHECK_AGAIN_S}, xx=True)
        except RedisError as error:  # the lease expires and the attempt is made again
            log.warning("webhook of job %s: Redis failed (%s); it will be tried again", job_id, error)
        except Exception:
            log.exception("webhook of job %s: unexpected error; it will be tried again", job_id)

    def _delivery(self, job_id: str) -> Delivery | None:
        """Thread pool: the ended job's URL and document (counted in the metrics once), or None."""
        store = self.services.store
        job = store.fetch(job_id)
        url = job.meta.get("webhook_url") if job is not None else None
        if job is None or not isinstance(url, str):
            return None
        snap = store.snapshot(job)
        if snap.status not in TERMINAL:  # retried between the sweep and now
            raise NotEndedYet(job_id)
        count_if_first_seen_finished(self.services, snap)
        return Delivery(job_id, url, job_view(snap).model_dump_json().encode())

    async def _count_attempt(self, job_id: str) -> tuple[int, float]:
        key = webhook_attempts_key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "attempts", 1)
            pipe.hsetnx(key, "first_at", repr(time.time()))
            pipe.hget(key, "first_at")
            pipe.expire(key, self.settings.result_ttl_s)
            attempts, _, first_at, _ = await pipe.execute()
        return int(attempts), float(first_at)

    async def _post(self, target: Target, delivery: Delivery, attempt: int) -> int:
        """POST the signed document to the first checked address that accepts a connection; its status."""
        url = httpx.URL(target.url)
        timestamp = int(time.time())
        headers = {
            "Host": url.netloc.decode("ascii"),
            "Content-Type": "application/json",
            HEADER_ID: delivery.job_id,
            HEADER_ATTEMPT: str(attempt),
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign(self.settings.webhook_secret, timestamp, delivery.body),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        for i, address in enumerate(target.addresses):
            try:
                async with self.http.stream(
                    "POST",
                    url.copy_with(host=str(address)),
                    content=delivery.body,
                    headers=headers,
                    extensions=extensions,
                ) as response:
                    return response.status_code  # its body is never read
            except httpx.ConnectError:
                if i == len(target.addresses) - 1:
                    raise
        raise AssertionError("unreachable: a target has at least one address")

    async def _retry_or_drop(self, job_id: str, attempt: int, first_at: float, reason: str) -> None:
        retry_at = time.time() + backoff_s(attempt)
        if retry_at > first_at + self.settings.webhook_retry_for_s:
            log.warning(
                "webhook of job %s dropped after %d attempts over %.0f s (SD_WEBHOOK_RETRY_FOR_S): %s",
                job_id,
                attempt,
                time.time() - first_at,
                reason,
            )
            await self._forget(job_id)
            return
        log.info(
            "webhook of job %s: attempt %d failed (%s); next in %.0f s",
            job_id,
            attempt,
            reason,
            retry_at - time.time(),
        )
        await self.redis.zadd(WEBHOOKS_PENDING_ZSET, {job_id: retry_at}, xx=True)

    async def _forget(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(WEBHOOKS_PENDING_ZSET, job_id)
            pipe.delete(webhook_attempts_key(job_id))
            await pipe.execute()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
