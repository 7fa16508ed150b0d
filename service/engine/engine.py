"""The generation engine: continuous batching of many LoRA adapters on one base (any supported family).

``add`` queues a request (after checking its adapter exists and it fits the context); every
``step`` either admits waiting requests into free rows and prefills them (their first token), or
runs one decode step for the running rows (one token each). A prefill step is always followed by a
decode step, so arrivals cannot starve running rows. A finished row leaves the batch in the same
step, so its slot is free for the next request at once. Which waiting requests join is the
``Scheduler``'s decision (``scheduler.py``). A newcomer whose prompt starts with blocks the prefix
cache holds for its base, adapter version or composition (``prefix.py``) prefills only the rest.

Metrics: the engine writes none. ``step`` returns a ``StepReport`` (events, prefill and decode
timings, latencies, adapter cache activity) and the worker exports it (``service.metrics``).

Threading: an Engine is used from ONE thread (the worker loop). It holds no locks; calls from a
second thread raise RuntimeError instead of corrupting the batch.

Context: ``prompt_tokens + max_new_tokens`` must fit the model's ``n_positions``, otherwise ``add``
raises PromptTooLong. The engine never clips ``max_new_tokens``; clipping (if wanted) is the
caller's decision, made before ``add``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import torch

from loracore import artifact
from loracore.families import base_shape, family_of_folder, shape_differences
from loracore.lora_format import BaseLayout
from loracore.template import DEFAULT_TEMPLATE, PromptTemplate
from trainer.model import load_base_model, load_tokenizer

from .batch import Batch, Row
from .cache import AdapterCache, AdapterError, LoadedAdapter, valid_ref
from .capacity import kv_bytes_per_token, plan_batch
from .constraints import Grammars
from .lora import AdapterFormatError, parse_adapter, read_adapter_files
from .model import kv_dtype_for
from .prefix import PrefixCache
from .prefix import identity as prefix_identity
from .runners import cache_shape, make_runner
from .sampling import (
    LogitBias,
    adjust_logits,
    apply_token_bitmask,
    choose_tokens,
    make_generator,
    prompt_logprobs,
    token_logprobs,
)
from .scheduler import Scheduler
from .text import Detokenizer, StopMatcher, byte_table
from .types import AdapterCacheFull, AdapterNotFound, GenerationRequest, PromptTooLong, StepReport, TokenEvent

log = logging.getLogger(__name__)


def resolve_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    """None means float16 on CUDA and float32 on CPU."""
    if dtype is not None:
        return dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32


class Engine:
    def __init__(
        self,
        model_path: str | Path,
        adapter_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int | None = None,
        kv_cache_bytes: int | None = None,
        max_loaded_adapters: int = 16,
        max_prefill_tokens: int = 2048,
        max_context: int | None = None,
        prefix_cache: bool = True,
    ):
        """Load the base and its tokenizer. The batch's capacity is what ``kv_cache_bytes`` (default:
        measured on the device, ``capacity.py``) holds at full context, at most ``max_batch_size``.
        ``max_prefill_tokens`` bounds the prompt tokens admitted in one step (a step with a huge
        prefill delays every running row's next token). ``max_context`` caps the context served
        (default ``loracore.families.DEFAULT_MAX_CONTEXT``; the model's own is the ceiling). A base of an
        unsupported family raises ``model.UnsupportedModel`` before its weights load. ``prefix_cache``:
        reuse the KV of prompt prefixes already prefilled (``prefix.py``), within the KV budget."""
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(device, dtype)
        self.model_path = Path(model_path)
        self.adapter_dir = Path(adapter_dir)
        family_of_folder(self.model_path)  # an unsupported base is refused before anything loads
        self.tokenizer = load_tokenizer(self.model_path, padding_side="left")
        model = load_base_model(self.model_path, dtype=self.dtype, device=str(self.device))
        shape = cache_shape(model.config, max_context)
        self.plan = plan_batch(
            device=self.device,
            per_token=kv_bytes_per_token(
                shape.n_layer, shape.kv_width, kv_dtype_for(self.device, self.dtype)
            ),
            row_tokens=shape.n_positions,
            max_batch_size=max_batch_size,
            kv_cache_bytes=kv_cache_bytes,
        )
        self.max_batch_size = self.plan.rows
        self.runner = make_runner(model, max_rows=self.max_batch_size, max_context=max_context)
        self.n_positions = self.runner.n_positions
        self.shapes = self.runner.module_shapes()
        # what an adapter must fit: the runner's own layers, by the rules of loracore.lora_format
        self.layout = BaseLayout(
            model.config.model_type, tuple(self.shapes), layer_path=self.runner.family.blocks
        )
        self.base_config = model.config.to_dict()
        self.eos_ids = self._eos_ids(model)
        self.bos_id = (
            self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.eos_ids)
        )
        self.byte_table = byte_table(self.tokenizer)
        if self.byte_table is None:
            log.warning("tokenizer is not byte-level BPE: incremental detokenization decodes whole sequences")
        self.adapters = AdapterCache(self.adapter_dir, self._load_adapter, max_loaded_adapters)
        self.prefix = PrefixCache(self.runner.kv, str(self.model_path)) if prefix_cache else None
        self.batch = Batch(self.runner, self.max_batch_size, self.prefix)
        self.grammars = Grammars(self.tokenizer, self.runner.vocab_size, self.eos_ids)
        self.scheduler = Scheduler(max_prefill_tokens)
        self._owner: int | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.started = time.time()

    @staticmethod
    def _eos_ids(model) -> set[int]:
        ids: set[int] = set()
        for source in (model.config, getattr(model, "generation_config", None)):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(e) for e in eos)
        return ids

    def _load_adapter(self, folder: Path):
        record = artifact.read_record(folder)
        if record is not None and record.base is not None:
            differs = shape_differences(record.base, base_shape(self.base_config))
            if differs:
                trained_on = record.base.get("name") or record.base_model or "another base"
                raise AdapterFormatError(
                    f"it was trained on {trained_on}, whose shape differs from the served base: "
                    + "; ".join(differs),
                    artifact.RECORD_FILE,
                )
        cfg, weights, _st = read_adapter_files(folder)
        digest = hashlib.sha256(weights).hexdigest()  # the version id of exactly these bytes
        weights_form = parse_adapter(
            cfg,
            weights,
            self.layout,
            dtype=self.dtype,
            device=self.device,
            base_weight=self.runner.base_weight,
        )
        return weights_form, digest

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("Engine is single-threaded: call add/step/cancel from one thread only")

    # --- public API -----------------------------------------------------------------------------
    def adapter_template(self, name: str | None) -> PromptTemplate:
        """The prompt template recorded in the adapter's ``loraserve.json`` (of the version ``name``
        names: ``name`` or ``name@<id prefix>``), else the default."""
        if name is None:
            return DEFAULT_TEMPLATE
        if not self.adapters.exists(name):
            raise AdapterNotFound(name)
        record = artifact.read_record(self.adapters.folder(name))
        if record is None or record.template is None:
            return DEFAULT_TEMPLATE
        try:
            return PromptTemplate.from_dict(record.template)
        except (ValueError, KeyError, TypeError):
            return DEFAULT_TEMPLATE

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (how a log-probability entry spells the token)."""
        if self.byte_table is not None and 0 <= token_id < len(self.byte_table):
            return self.byte_table[token_id]
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def add(self, req: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next ``step``.

        Raises AdapterNotFound (naming the first unknown adapter of a composition), PromptTooLong, or
        ValueError (bad parameters or composition, duplicate id, a JSON schema that cannot be
        compiled: ``structured.SchemaError``).
        An empty prompt is started from the BOS token (counted as one prompt token).
        """
        self._check_thread()
        req.params.validate()
        if not req.prompt_ids:
            req.prompt_ids = [self.bos_id]
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {vocab})")
        if any(t >= vocab for t in req.params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        if len(req.prompt_ids) + req.params.max_new_tokens > self.n_positions:
            raise PromptTooLong(len(req.prompt_ids), req.params.max_new_tokens, self.n_positions)
        req.validate_composition()
        names = req.adapter_names()
        if len(names) > self.adapters.capacity:
            raise ValueError(
                f"the composition uses {len(names)} adapters; this server holds at most "
                f"{self.adapters.capacity} in memory at once"
            )
        for name in names:
            if not self.adapters.exists(name):
                raise AdapterNotFound(name, "" if valid_ref(name) else "invalid adapter name or version")
        unpinned = [n for n in dict.fromkeys(names) if not self.adapters.is_pinned(n)]
        if unpinned and len(unpinned) > self.adapters.free_slots():
            raise AdapterCacheFull(unpinned, self.adapters.capacity, self.adapters.free_slots())
        if any(r.id == req.id for r in self.scheduler) or any(r.req.id == req.id for r in self.batch.rows):
            raise ValueError(f"request id {req.id!r} is already queued or running")
        if req.params.json_schema is not None:
            self.grammars.check(req.params.json_schema)  # compiled once per schema, here: not mid-step
        self.scheduler.add(req)

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or running request; no event is produced for it."""
        self._check_thread()
        if self.scheduler.remove(request_id):
            return
        for row in self.batch.rows:
            if row.req.id == request_id:
                self._leave([row])
                return

    def has_active(self) -> bool:
        return bool(self.scheduler) or bool(self.batch.rows)

    def has_capacity(self) -> bool:
        """True while running + waiting requests are fewer than ``max_batch_size``.

        ``add`` accepts more than that (they wait for a free row); this is the hint for how many
        to take from an upstream queue.
        """
        return len(self.batch.rows) + len(self.scheduler) < self.max_batch_size

    def stats(self) -> dict:
        cache = self.adapters.stats()
        return {
            "rows": len(self.batch.rows),
            "waiting": len(self.scheduler),
            "max_batch_size": self.max_batch_size,
            "batch_plan": self.plan.to_dict(),
            "adapters_loaded": self.adapters.loaded(),
            "adapter_cache": cache,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "kv_capacity_tokens": self.runner.capacity,
            "kv_bytes": self.runner.kv_bytes(),
            # what the KV cache holds of what it can hold at most (every row at full context)
            "kv_tokens_used": sum(r.length for r in self.batch.rows),
            "kv_tokens_max": self.max_batch_size * self.n_positions,
            "kv_cache": self.kv_use(),
            "running_adapters": sorted({r.req.adapter for r in self.batch.rows if r.req.adapter}),
            "waiting_adapters": sorted({r.adapter for r in self.scheduler if r.adapter}),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_positions": self.n_positions,
        }

    def kv_use(self) -> dict:
        """The KV cache's blocks (``kv.py``): a block is ``block_tokens`` positions of one row, every
        layer's K and V, ``block_bytes`` of memory; a row holds the blocks its length reaches."""
        kv = self.runner.kv
        used = sum(kv.blocks(r.length) for r in self.batch.rows)
        return {
            "block_tokens": kv.block_tokens,
            "block_bytes": kv.block_bytes,
            "blocks_used": used,
            "blocks_total": kv.blocks_total,
            "usage": used / kv.blocks_total,
            # the prefix cache's blocks (``prefix.py``), out of the same budget
            "prefix_cache": self.prefix is not None,
            "prefix_blocks": len(self.prefix.blocks) if self.prefix is not None else 0,
            "prefix_bytes": self.prefix.nbytes if self.prefix is not None else 0,
        }

    def step(self) -> StepReport:
        """Admit and prefill newcomers (first token each), or run one decode step for the running
        rows (one token each). Finished rows leave before this returns.

        A newcomer's first token goes out right after its prefill instead of after a decode of the
        whole batch as well (under load, one decode step sooner), and a prefill step is always
        followed by a decode step: the running rows get a token per prefill + decode, as they
        would if both ran in one step. The report carries the events and what the step measured."""
        self._check_thread()
        report = StepReport()
        events = report.events
        running = len(self.batch.rows)
        newcomers = self._admit(running, report)
        if newcomers:
            running = 0  # this step prefills only
            t0 = time.perf_counter()
            report.prefill_rows = len(newcomers)
            self._fit_prefixes(newcomers=newcomers)
            report.prefill_tokens = sum(
                len(r.prompt_ids) - len(r.prefix_hit) * self._block for r in newcomers
            )
            try:
                logits, full = self.batch.join(newcomers)
            except Exception as exc:  # e.g. out of memory: only these requests fail
                log.exception("prefill failed")
                for row in newcomers:
                    self._release(row)
                    events.append(self._error(row.req, f"prefill failed: {exc}"))
            else:
                scored = self._score_prompts(newcomers, full)
                generating = [i for i, r in enumerate(newcomers) if r.req.params.max_new_tokens]
                if len(generating) < len(newcomers):
                    keep = torch.tensor(generating, dtype=torch.long, device=logits.device)
                    logits = logits.index_select(0, keep)
                    events.extend(
                        self._scored_only(r, scored) for r in newcomers if not r.req.params.max_new_tokens
                    )
                if generating:
                    self._sample([newcomers[i] for i in generating], logits, report, scored)
            self._fit_prefixes()
            report.prefill_seconds = time.perf_counter() - t0
        if running:
            rows = self.batch.rows[:running]
            t0 = time.perf_counter()
            report.decode_rows = running
            self._fit_prefixes(grow=1)
            try:
                logits = self.batch.decode(running)
            except Exception as exc:
                log.exception("decode step failed")
                self._leave(rows)
                events.extend(self._error(r.req, f"decode failed: {exc}", r.completion) for r in rows)
            else:
                self._sample(rows, logits, report)
            report.decode_seconds = time.perf_counter() - t0
        finished = [r for r in self.batch.rows if r.finished]
        if finished:
            self._leave(finished)
        report.running = len(self.batch.rows)
        report.adapters = self.adapters.take_activity()
        if self.prefix is not None:
            report.prefix = self.prefix.take_activity()
        self.steps += 1
        return report

    # --- internals ------------------------------------------------------------------------------
    @property
    def _block(self) -> int:
        return self.runner.kv.block_tokens

    def _lookup_prefix(self, row: Row) -> None:
        """A newcomer's longest cached prefix (``prefix.py``). A row that scores its prompt needs every
        position's logits, so it prefills all of it (no lookup)."""
        if self.prefix is not None and row.req.params.prompt_logprobs is None:
            row.prefix_hit = self.prefix.match(prefix_identity(row), row.prompt_ids)

    def _fit_prefixes(self, grow: int = 0, newcomers: list[Row] = ()) -> None:
        """Evict cached prefix blocks (least recently used first) until the cache holds no more than
        the KV budget leaves beside the running rows, each ``grow`` tokens longer, and the newcomers'
        prompts: the rows always come first."""
        if self.prefix is None or not self.prefix.blocks:
            return
        kv = self.runner.kv
        if kv.lazy:  # on CPU rows commit the blocks they reach
            blocks = sum(kv.blocks(r.length + grow) for r in self.batch.rows)
            blocks += sum(kv.blocks(len(r.prompt_ids)) for r in newcomers)
            rows = blocks * kv.block_bytes
        else:  # on CUDA the slots are allocated whole
            rows = kv.reserved_bytes()
        self.prefix.evict_to(self.plan.kv_budget_bytes - rows)

    def _admit(self, running: int, report: StepReport) -> list[Row]:
        """The newcomers the scheduler lets in, each with its adapter pinned.

        A request whose adapter (or one of whose composition's adapters) cannot be loaded without
        evicting a pinned one waits (others may pass it); a request whose adapter vanished or is
        broken gets an error event. A composed row pins every adapter it uses, each once per entry.
        """

        def ready(req: GenerationRequest) -> bool:
            return self.adapters.can_acquire_all(req.adapter_names())

        def join(req: GenerationRequest) -> Row | None:
            names = [req.adapter] if req.adapters is None else [c.name for c in req.adapters]
            try:
                pinned = self.adapters.acquire_all([n for n in names if n is not None])
            except FileNotFoundError as exc:
                missing = AdapterNotFound(exc.args[0] if exc.args else "?")
                report.events.append(self._error(req, str(missing), code="adapter_not_found"))
                return None
            except AdapterError as exc:  # the adapter's fault (422) or the server's (5xx): exc.code
                report.events.append(self._error(req, str(exc), code=exc.code))
                return None
            dora = _dora_in_composition(req, pinned)
            if dora is not None:
                for entry in pinned:
                    self.adapters.release(entry)
                message = (
                    f"adapter {dora!r} is a DoRA adapter (use_dora): a weighted composition cannot include "
                    "it (the weighted sum of DoRA adapters is not defined); request it alone"
                )
                report.events.append(self._error(req, message, code="invalid_adapter"))
                return None
            if req.adapters is not None:
                row = self._new_row(req, None, report, tuple(pinned))
            else:
                row = self._new_row(req, pinned[0] if pinned else None, report)
            self._lookup_prefix(row)
            return row

        def cost(row: Row) -> int:  # what the row prefills: its prompt less the cached prefix
            return len(row.prompt_ids) - len(row.prefix_hit) * self._block

        admitted = self.scheduler.admit(
            running=running, free=self.batch.free, ready=ready, join=join, cost=cost
        )
        self._share_mixes(admitted)
        return admitted

    def _share_mixes(self, newcomers: list[Row]) -> None:
        """Rows on the same composition (same adapter versions and weights) share one ``Mix``, so
        their prefill ranges are adjacent and merge (``Batch.join`` orders newcomers by it)."""
        if not any(r.mix is not None for r in newcomers):
            return
        shared = {}
        for row in [*self.batch.rows, *newcomers]:
            if row.mix is not None:
                key = tuple((id(w), weight) for w, weight in row.mix.parts)  # the Mix keeps w alive
                row.mix = shared.setdefault(key, row.mix)

    def _new_row(
        self,
        req: GenerationRequest,
        entry: LoadedAdapter | None,
        report: StepReport,
        parts: tuple[LoadedAdapter, ...] = (),
    ) -> Row:
        now = time.monotonic()
        report.queue_wait_seconds.append(max(0.0, now - req.arrival))
        p = req.params
        gen, seed = (None, None) if p.greedy else make_generator(p.seed, self.device)
        row = Row(
            req=req,
            adapter=entry,
            generator=gen,
            seed=seed,
            detok=Detokenizer(self.tokenizer, self.byte_table),
            stopper=StopMatcher(req.params.stop),
            prompt_ids=list(req.prompt_ids),
            admitted=now,
            bias=LogitBias.of(p.logit_bias, self.device),
            counts={} if p.penalized else None,
            constraint=None if p.json_schema is None else self.grammars.start(p.json_schema),
            parts=parts,
        )
        for label in row.labels:
            report.prompt_tokens[label] = report.prompt_tokens.get(label, 0) + len(req.prompt_ids)
        return row

    def _score_prompts(self, rows: list[Row], full: list[torch.Tensor | None]) -> dict[str, list]:
        """The prompt log-probabilities of the rows that asked (``Batch.join``'s every-position logits),
        by request id."""
        return {
            r.req.id: prompt_logprobs(f, r.prompt_ids, r.req.params.prompt_logprobs or 0)
            for r, f in zip(rows, full, strict=True)
            if f is not None
        }

    def _scored_only(self, row: Row, scored: dict[str, list]) -> TokenEvent:
        """The one event of a row that scores its prompt and generates nothing (max_new_tokens 0)."""
        row.finished = True
        return TokenEvent(
            id=row.req.id,
            text="",
            token_id=None,
            finished=True,
            finish_reason="length",
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=0,
            prompt_logprobs=scored.get(row.req.id),
        )

    def _sample(
        self, rows: list[Row], logits: torch.Tensor, report: StepReport, scored: dict[str, list] | None = None
    ) -> None:
        """Choose and record one token per row; a row whose sampling, detokenizing or stop matching
        raises fails alone (an error event, it leaves the batch) and its batch-mates go on. ``scored``:
        the prompt log-probabilities of newcomers that asked, put on their first event."""
        params = [r.req.params for r in rows]
        logits = adjust_logits(logits, params, [r.bias for r in rows], [r.counts for r in rows])
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        if constrained:  # free rows of the batch keep their logits untouched
            masks = self.grammars.masks([rows[i].constraint for i in constrained])
            logits = apply_token_bitmask(logits, constrained, masks)
        tokens = self._choose(rows, logits)
        # a failed row's slot holds a placeholder id: its logprobs are never read
        logprobs = token_logprobs(logits, params, [t if isinstance(t, int) else 0 for t in tokens])
        now = time.monotonic()
        per_adapter = report.generated_tokens
        for row, token, lp in zip(rows, tokens, logprobs, strict=True):
            if isinstance(token, Exception):
                report.events.append(self._fail_row(row, "sampling", token))
                continue
            try:
                if row.counts is not None:
                    row.counts[token] = row.counts.get(token, 0) + 1
                event = self._advance(row, token, now, report)
            except Exception as exc:
                event = self._fail_row(row, "detokenizing or stop matching", exc)
            else:
                if lp is not None:
                    event.logprob, event.top_logprobs = lp
                if scored:
                    event.prompt_logprobs = scored.get(row.req.id)
                for label in row.labels:  # a composed row's token counts once for each of its adapters
                    per_adapter[label] = per_adapter.get(label, 0) + 1
                self.tokens_generated += 1
            report.events.append(event)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int | Exception]:
        """One batched ``choose_tokens``; if it raises, each row alone from the same generator states,
        so the rows that do not fail draw exactly the tokens the batched call would have given them."""
        params = [r.req.params for r in rows]
        gens = [r.generator for r in rows]
        states = [g.get_state() if isinstance(g, torch.Generator) else None for g in gens]
        try:
            return list(choose_tokens(logits, params, gens))
        except Exception:
            log.warning("batched sampling failed; sampling the %d rows one by one", len(rows), exc_info=True)
        out: list[int | Exception] = []
        for i, (p, g, state) in enumerate(zip(params, gens, states, strict=True)):
            if state is not None:
                g.set_state(state)
            try:
                out.append(choose_tokens(logits[i : i + 1], [p], [g])[0])
            except Exception as exc:
                out.append(exc)
        return out

    def _fail_row(self, row: Row, stage: str, exc: Exception) -> TokenEvent:
        """End one row with an error event; ``step`` takes it out of the batch with the finished rows."""
        log.error("request %s failed in %s: %s: %s", row.req.id, stage, type(exc).__name__, exc, exc_info=exc)
        row.finished = True
        return self._error(row.req, f"{stage} failed: {type(exc).__name__}: {exc}", row.completion)

    def _advance(self, row: Row, token: int, now: float, report: StepReport) -> TokenEvent:
        """Record one generated token: text delta, stop conditions, latencies."""
        if row.completion == 0:
            ttft = max(0.0, now - row.req.arrival)
            report.first_token_seconds.extend((label, ttft) for label in row.labels)
        else:
            report.inter_token_seconds.append(now - row.last_time)
        row.last_time = now
        row.completion += 1
        row.last_token = token
        p = row.req.params
        reason = None
        is_eos = token in self.eos_ids
        if row.constraint is not None and not is_eos:
            refused = row.constraint.advance(token)
            if refused is not None:
                row.finished = True
                return self._error(row.req, refused, row.completion)
        if is_eos and not p.ignore_eos:
            text, stopped = row.stopper.feed(row.detok.flush(), final=True)
            reason = "stop" if stopped else "eos"
        else:
            piece = row.detok.push(token)
            out_of_tokens = row.completion >= p.max_new_tokens
            if out_of_tokens:
                piece += row.detok.flush()
            text, stopped = row.stopper.feed(piece, final=out_of_tokens)
            if stopped:
                reason = "stop"
            elif out_of_tokens:
                reason = "length"
        row.finished = reason is not None
        return TokenEvent(
            id=row.req.id,
            text=text,
            token_id=token,
            finished=row.finished,
            finish_reason=reason,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=row.completion,
        )

    def _error(
        self, req: GenerationRequest, message: str, completion: int = 0, code: str | None = None
    ) -> TokenEvent:
        return TokenEvent(
            id=req.id,
            text="",
            token_id=None,
            finished=True,
            finish_reason="error",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=completion,
            error=message,
            error_code=code,
        )

    def _release(self, row: Row) -> None:
        if not row.released:
            for entry in row.pins:
                self.adapters.release(entry)
        row.released = True

    def _leave(self, rows: list[Row]) -> None:
        for r in rows:
            self._release(r)
            r.constraint = None  # the grammar state goes with the row
        self.batch.remove(rows)


def _dora_in_composition(req: GenerationRequest, pinned: list[LoadedAdapter]) -> str | None:
    """The name of a weighted composition's first DoRA adapter (without its version), else None. One
    entry of weight 1 is the adapter alone (``batch.Row``), DoRA or not."""
    parts = req.adapters
    if parts is None or (len(parts) == 1 and parts[0].weight == 1):
        return None
    for part, entry in zip(parts, pinned, strict=True):
        if getattr(entry.weights, "dora", None) is not None:
            return artifact.split_ref(part.name)[0]
    return None
