"""The vllm engine: vLLM's decoder layers, kernels and paged KV cache for a layer range [A, B).

vLLM builds and loads only the shard (see vllm_compat, the one module that touches vLLM's
internals); this module is the engine side, written against the `Engine` contract like the torch
engine and independent of the vLLM version:

* KV cache: a pool of fixed-size blocks shared by every layer of the shard; a request holds
  ceil(tokens / block_size) blocks from its first step until it is released. Admission checks
  both the simulator's token×layer units (the base class) and free blocks: with partial
  inference a request still holds its blocks on the layers it skips (vLLM has one block table
  for every layer), so blocks can run out before token×layer units do.
* A step is one pass through the shard's layers for the whole batch: token ids are embedded (first
  stage), hidden states are taken as they come (later stages). Rows are ordered decodes first, as
  vLLM's own runner orders them. Requests that enter at a later layer (partial inference) join at
  that layer: each layer runs only the rows that have reached it, with attention metadata built
  for just those requests (one build per distinct entry layer, not per layer).
* Hidden states cross hops as the residual stream, the same tensor the torch engine sends (vLLM's
  layers keep it split as hidden + residual; a row entering a shard starts with a zero residual,
  which leaves vLLM's fused add-and-norm exact). So a route may mix torch and vllm hops.
* The last stage returns the token: greedy argmax, or the torch engine's seeded sampler, so a
  request samples the same tokens whichever engine ends its route.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from helix.worker.engines import vllm_compat
from helix.worker.engines.base import (
    Engine,
    EngineError,
    InvalidStepError,
    KVCacheFullError,
    PlannedStep,
    RequestState,
    StepInput,
    StepOutput,
    register_engine,
)
from helix.worker.engines.torch_engine import CPU_DEFAULT_KV_BYTES, DEFAULT_GPU_KV_FRACTION, sample_token
from helix.worker.engines.torch_loading import load_config, resolve_device, resolve_dtype
from helix.worker.engines.vllm_compat import NULL_BLOCK, PagedAttention, VllmShard


@register_engine("vllm")
class VllmEngine(Engine):
    """vLLM decoder layers [A, B) with a paged KV cache and continuous batching."""

    def __init__(self, *, model_dir: Path, shard: VllmShard, kv_capacity_tokens: int) -> None:
        super().__init__(
            model_dir=model_dir,
            start_layer=shard.start,
            end_layer=shard.end,
            num_layers=shard.num_layers,
            hidden_size=shard.hidden_size,
            vocab_size=shard.vocab_size,
            kv_capacity_tokens=kv_capacity_tokens,
            device=str(shard.device),
            dtype=str(shard.dtype).removeprefix("torch."),
        )
        self.shard = shard
        self.block_size = shard.block_size
        self.max_model_len = shard.max_model_len
        self._free_blocks = list(range(NULL_BLOCK + 1, shard.num_blocks + 1))

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start_layer: int,
        end_layer: int,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        kv_capacity_tokens: int | None = None,
        block_size: int | None = None,
        max_model_len: int | None = None,
        kv_memory_fraction: float = DEFAULT_GPU_KV_FRACTION,
        **options: Any,
    ) -> VllmEngine:
        """Load layers [start_layer, end_layer) of the checkpoint in `model_dir` with vLLM.

        block_size / max_model_len: vLLM's (None: the platform's block size, the model's context).
        kv_capacity_tokens None: on CUDA `kv_memory_fraction` of the free memory after loading,
        on CPU a 1 GiB budget, as the torch engine does.
        """
        if options:
            raise EngineError(f"vllm engine: unknown options {sorted(options)}")
        model_dir = Path(model_dir)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, load_config(model_dir), torch_device)

        def kv_budget_bytes() -> int:
            if torch_device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(torch_device)
                return int(free * kv_memory_fraction)
            return CPU_DEFAULT_KV_BYTES

        shard = VllmShard(
            model_dir,
            start_layer,
            end_layer,
            device=torch_device,
            dtype=torch_dtype,
            kv_tokens=kv_capacity_tokens,
            kv_budget_bytes=kv_budget_bytes,
            block_size=block_size,
            max_model_len=max_model_len,
        )
        capacity = kv_capacity_tokens if kv_capacity_tokens is not None else shard.num_blocks * shard.block_size
        engine = cls(model_dir=model_dir, shard=shard, kv_capacity_tokens=capacity)
        engine._try_one_token()
        return engine

    def _try_one_token(self) -> None:
        """Run one token through the shard: kernels refuse some shapes (vLLM's CPU attention wants a
        head size of at least 32) only when they first run, and a worker should fail at start-up, not
        answer every request with an internal error."""
        probe = StepInput(
            "helix-load-probe",
            "prompt",
            [0],
            token_ids=[0] if self.is_first else None,
            hidden_states=None if self.is_first else torch.zeros(1, self.hidden_size),
        )
        try:
            self.step([probe])
        except EngineError:
            raise
        except RuntimeError as exc:
            self.close()
            raise EngineError(f"vLLM cannot run this model here: {exc}") from exc
        finally:
            self.release(probe.request_id)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "vllm_version": vllm_compat.VERSION,
            "block_size": self.block_size,
            "kv_blocks": self.shard.num_blocks,
            "max_model_len": self.max_model_len,
        }

    # -- KV blocks ------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _plan(self, batch: Sequence[StepInput], errors: dict[str, EngineError]) -> list[PlannedStep]:
        """The base checks, then the context limit and free blocks (cumulatively, in batch order)."""
        free = len(self._free_blocks)
        admitted: list[PlannedStep] = []
        for plan in super()._plan(batch, errors):
            rid = plan.input.request_id
            end = plan.past_tokens + plan.input.num_tokens
            if end > self.max_model_len:
                errors[rid] = InvalidStepError(f"{end} tokens exceed the context of {self.max_model_len}", rid)
                continue
            state = self._requests.get(rid)
            held = len(state.extra) if state is not None and state.extra is not None else 0
            need = self._blocks_for(end) - (0 if plan.restart else held)
            freed = held if plan.restart else 0
            if need - freed > free:
                per_block = self.block_size * (self.end_layer - plan.run_from_layer)
                errors[rid] = KVCacheFullError(
                    f"KV cache full: needs {need - freed} blocks of {self.block_size} tokens, {free} free of "
                    f"{self.shard.num_blocks}",
                    rid,
                    needed=(need - freed) * per_block,
                    free=free * per_block,
                )
                continue
            free -= need - freed
            admitted.append(plan)
        return admitted

    def _grow(self, state: RequestState, tokens: int) -> list[int]:
        blocks: list[int] = state.extra if state.extra is not None else []
        for _ in range(self._blocks_for(tokens) - len(blocks)):
            blocks.append(self._free_blocks.pop())
        state.extra = blocks
        return blocks

    def _free(self, state: RequestState) -> None:
        if state.extra is not None:
            self._free_blocks.extend(state.extra)
        state.extra = None

    def _allocated_bytes(self) -> int:
        return (self.shard.num_blocks - len(self._free_blocks)) * self.shard.bytes_per_block

    def close(self) -> None:
        super().close()
        self.shard.close()

    # -- the forward pass -----------------------------------------------------------------------

    def _execute(self, plans: Sequence[PlannedStep], states: Sequence[RequestState]) -> list[StepOutput]:
        dev = self.shard.device
        order = sorted(range(len(plans)), key=lambda i: plans[i].input.num_tokens > 1)  # decodes first
        plans = [plans[i] for i in order]
        states = [states[i] for i in order]
        new = [p.input.num_tokens for p in plans]
        past = [p.past_tokens for p in plans]
        starts = [p.run_from_layer for p in plans]
        blocks = [self._grow(s, p + n) for s, p, n in zip(states, past, new, strict=True)]
        offsets = [0]
        for n in new:
            offsets.append(offsets[-1] + n)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(past, new, strict=True)])
        slots = torch.cat(
            [
                torch.as_tensor(b, dtype=torch.long)[torch.arange(p, p + n) // self.block_size] * self.block_size
                + torch.arange(p, p + n) % self.block_size
                for b, p, n in zip(blocks, past, new, strict=True)
            ]
        )

        with torch.no_grad():
            hidden = torch.empty(offsets[-1], self.hidden_size, device=dev, dtype=self.shard.dtype)
            embed_rows = [i for i, s in enumerate(starts) if s == 0]
            if embed_rows:
                ids = [int(t) for i in embed_rows for t in plans[i].input.token_ids or ()]
                embed_at = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in embed_rows]).to(dev)
                hidden[embed_at] = self.shard.embed(torch.as_tensor(ids, dtype=torch.long, device=dev))
            for i, plan in enumerate(plans):
                if starts[i] != 0:
                    assert plan.input.hidden_states is not None
                    hidden[offsets[i] : offsets[i + 1]] = plan.input.hidden_states.to(device=dev, dtype=hidden.dtype)
            residual = torch.zeros_like(hidden)
            positions = positions.to(dev)
            slots = slots.to(dev)

            # One attention call per distinct entry layer: from it to the next, the same rows run.
            entry_layers = sorted(set(starts))
            calls: dict[int, PagedAttention] = {}
            gathers: dict[int, torch.Tensor | None] = {}
            for k, first in enumerate(entry_layers):
                rows = [i for i, s in enumerate(starts) if s <= first]
                active = (
                    None
                    if len(rows) == len(plans)
                    else torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in rows]).to(dev)
                )
                call = PagedAttention(
                    query_lens=[new[i] for i in rows],
                    seq_lens=[past[i] + new[i] for i in rows],
                    block_table=self._block_table([blocks[i] for i in rows]),
                    slot_mapping=slots if active is None else slots[active],
                    positions=positions if active is None else positions[active],
                )
                last = entry_layers[k + 1] if k + 1 < len(entry_layers) else self.end_layer
                for layer in range(first, last):
                    calls[layer] = call
                    gathers[layer] = active

            with self.shard.forward_context(calls):
                for layer in range(entry_layers[0], self.end_layer):
                    rows_at = gathers[layer]
                    if rows_at is None:
                        hidden, residual = self.shard.run_layer(layer, positions, hidden, residual)
                    else:
                        h, r = self.shard.run_layer(layer, calls[layer].positions, hidden[rows_at], residual[rows_at])
                        hidden = hidden.index_copy(0, rows_at, h)
                        residual = residual.index_copy(0, rows_at, r)

            outputs: list[StepOutput] = []
            if self.is_last:
                last_tokens = torch.as_tensor(offsets[1:], device=dev) - 1
                logits = self.shard.logits(hidden[last_tokens], residual[last_tokens]).float()
                greedy = logits.argmax(dim=-1).tolist()
                for row, plan in enumerate(plans):
                    item = plan.input
                    token = (
                        greedy[row]
                        if item.sampling.greedy
                        else sample_token(logits[row], item.sampling, item.request_id, past[row] + new[row])
                    )
                    outputs.append(
                        StepOutput(item.request_id, plan.run_from_layer, self.end_layer, token_id=int(token))
                    )
            else:
                stream = hidden + residual
                for row, plan in enumerate(plans):
                    outputs.append(
                        StepOutput(
                            plan.input.request_id,
                            plan.run_from_layer,
                            self.end_layer,
                            hidden_states=stream[offsets[row] : offsets[row + 1]],
                        )
                    )
        result: list[StepOutput] = [outputs[0]] * len(plans)
        for sorted_row, original in enumerate(order):
            result[original] = outputs[sorted_row]
        return result

    def _block_table(self, tables: Sequence[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        table = torch.full((len(tables), width), NULL_BLOCK, dtype=torch.int32)
        for row, blocks in enumerate(tables):
            table[row, : len(blocks)] = torch.as_tensor(blocks, dtype=torch.int32)
        return table.to(self.shard.device)
