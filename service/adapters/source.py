"""Adapters fetched on first use from ``--adapter-source``: a directory (a shared read-only mount) or
an http(s) base URL serving ``<name>/adapter_config.json``, ``<name>/adapter_model.safetensors`` and,
optionally, ``<name>/loraserve.json``.

The first request naming an adapter that is not in the adapter directory fetches it into the
directory, through the same validation (``store.validate_upload``) and atomic publish
(``store.publish``) as an upload; from then on it is a local adapter like any other. Concurrent first
requests fetch once: one exclusive lock per name (``.staging/fetch-<name>.lock``) covers the threads
and the API processes of a server, and whoever waited finds the adapter published.

A name the source does not have stays a 404 (the request's own). A source that answers an error
or cannot be reached is ``502 adapter_source_failed``, one that takes longer than
``--adapter-source-timeout`` ``504 adapter_source_timeout``, both naming the source; a folder that
fails validation is ``422``, and weights whose sha256 differs from the one in the fetched
``loraserve.json`` are ``422 adapter_checksum_mismatch``. Nothing is written unless it all passes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from loracore import artifact
from loracore.artifact import CONFIG_FILE, RECORD_FILE, STAGING, WEIGHTS_FILE
from loracore.lora_format import BaseLayout
from loracore.template import DEFAULT_TEMPLATE
from service.adapters import store
from service.errors import ApiError, domain_error

CHUNK = 1 << 16


@dataclass(frozen=True)
class AdapterSource:
    """Where adapters come from: ``location`` is a directory or an http(s) base URL."""

    location: str
    timeout: float = 30.0

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    def __str__(self) -> str:
        """The source as messages name it: a URL without its query (a presigned one's signature)."""
        if not self.is_url:
            return self.location
        parts = urlsplit(self.location)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def read(self, name: str, file: str, limit: int, param: str, deadline: float) -> bytes | None:
        """The bytes of ``<name>/<file>``; None when the source does not have it. 502/504 when the
        source fails or passes ``deadline`` (``time.monotonic()``), 422 past ``limit`` bytes."""
        if self.is_url:
            return self._get(name, file, limit, param, deadline)
        path = Path(self.location) / name / file
        try:
            if path.stat().st_size > limit:
                raise _too_large(self, name, file, limit, param)
            return path.read_bytes()
        except FileNotFoundError:
            if not Path(self.location).is_dir():
                raise self.failed(f"the directory {self.location} is not there", param) from None
            return None
        except OSError as exc:
            raise self.failed(f"reading {name}/{file}: {exc.strerror or exc}", param) from exc

    def _url(self, name: str, file: str) -> str:
        parts = urlsplit(self.location)
        path = parts.path.rstrip("/") + f"/{quote(name)}/{quote(file)}"
        return parts._replace(path=path).geturl()

    def _get(self, name: str, file: str, limit: int, param: str, deadline: float) -> bytes | None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out(name, file, param)
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(left), follow_redirects=True) as client,
                client.stream("GET", self._url(name, file)) as response,
            ):
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    raise self.failed(f"GET {name}/{file} answered HTTP {response.status_code}", param)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _too_large(self, name, file, limit, param)
                body = bytearray()
                for chunk in response.iter_bytes(CHUNK):
                    body += chunk
                    if len(body) > limit:
                        raise _too_large(self, name, file, limit, param)
                    if time.monotonic() > deadline:  # a source that trickles bytes
                        raise self.timed_out(name, file, param)
                return bytes(body)
        except httpx.TimeoutException as exc:
            raise self.timed_out(name, file, param) from exc
        except httpx.HTTPError as exc:
            raise self.failed(f"GET {name}/{file} failed: {type(exc).__name__}: {exc}", param) from exc

    def failed(self, what: str, param: str) -> ApiError:
        return domain_error("adapter_source_failed", f"adapter source {self}: {what}", param)

    def timed_out(self, name: str, file: str, param: str) -> ApiError:
        return domain_error(
            "adapter_source_timeout",
            f"adapter source {self}: fetching {name}/{file} took longer than {self.timeout:g} s "
            "(--adapter-source-timeout)",
            param,
        )


def _too_large(source: AdapterSource, name: str, file: str, limit: int, param: str) -> ApiError:
    return ApiError(
        422, "invalid_adapter", f"adapter source {source}: {name}/{file} is larger than {limit} bytes", param
    )


@dataclass(frozen=True)
class Fetcher:
    """Fetches unknown adapters from ``source`` into ``adapter_dir`` as uploads are published."""

    source: AdapterSource
    adapter_dir: Path
    layout: BaseLayout
    base_model: str  # recorded as an upload records it
    keep: int  # earlier versions kept (``--keep-adapter-versions``)
    max_bytes: int  # of the weights (``--max-upload-bytes``)

    def ensure(self, name: str, param: str = "adapter") -> bool:
        """Fetch ``name`` unless the adapter directory has it; True when this call published it, False
        when it was there or the source does not have it (the caller's 404 stands)."""
        if not artifact.valid_name(name) or store.exists(self.adapter_dir, name):
            return False
        with _locked(self.adapter_dir / STAGING / f"fetch-{name}.lock"):
            if store.exists(self.adapter_dir, name):  # fetched while this one waited
                return False
            return self._fetch(name, param)

    def _fetch(self, name: str, param: str) -> bool:
        deadline = time.monotonic() + self.source.timeout
        config = self.source.read(name, CONFIG_FILE, store.MAX_CONFIG_BYTES, param, deadline)
        if config is None:
            return False
        weights = self.source.read(name, WEIGHTS_FILE, self.max_bytes, param, deadline)
        if weights is None:
            raise self._invalid(
                name, f"{name}/{CONFIG_FILE} is there but {name}/{WEIGHTS_FILE} is not", param
            )
        record_raw = self.source.read(name, RECORD_FILE, store.MAX_CONFIG_BYTES, param, deadline)
        record = artifact.Record()
        if record_raw is not None:
            try:
                data = json.loads(record_raw)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as exc:
                raise self._invalid(name, f"{name}/{RECORD_FILE} is not valid JSON: {exc}", param) from exc
            record = artifact.Record.from_dict(data)
        digest = hashlib.sha256(weights).hexdigest()
        if record.sha256 is not None and record.sha256 != digest:
            raise domain_error(
                "adapter_checksum_mismatch",
                f"adapter source {self.source}: {name}/{WEIGHTS_FILE} has sha256 {digest[:16]}…, but its "
                f"{RECORD_FILE} says {str(record.sha256)[:16]}… (corrupt or replaced in transit); nothing "
                "was stored",
                param,
            )
        try:
            store.validate_upload(config, weights, self.layout)
            template = (
                store.parse_template(json.dumps(record.template)) if record.template else DEFAULT_TEMPLATE
            )
        except ApiError as exc:
            raise self._invalid(name, exc.message, param, exc.code) from exc
        try:
            store.publish(
                self.adapter_dir, name, config, weights, template, self.base_model, self.keep, replace=False
            )
        except artifact.NameTaken:  # uploaded meanwhile: that one stands
            return False
        return True

    def _invalid(self, name: str, what: str, param: str, code: str = "invalid_adapter") -> ApiError:
        return ApiError(
            422, code, f"adapter {name!r} from adapter source {self.source} is not servable: {what}", param
        )

    async def ensure_all(self, refs: list[tuple[str | None, str]]) -> None:
        """``ensure`` each (reference, param) whose name is not local, in a thread (a fetch blocks)."""
        for ref, param in refs:
            if ref is None:
                continue
            name = artifact.split_ref(ref)[0]
            if artifact.valid_name(name) and not store.exists(self.adapter_dir, name):
                await asyncio.to_thread(self.ensure, name, param)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
