"""The torch layer-shard engine: any split and any route gives the whole model's tokens.

Everything runs in float64 on the tiny random model, so "token-identical" is not at the mercy of
argmax ties; the reference is transformers' own LlamaForCausalLM recomputing the full sequence for
every token (no KV cache), so it shares nothing with the engine's cache or batching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from helix.worker.engines import (  # noqa: E402
    GREEDY,
    Engine,
    EngineError,
    InvalidStepError,
    KVCacheFullError,
    SamplingParams,
    StepInput,
    StepOutput,
    UnknownRequestError,
    engine_names,
    get_engine,
    load_engine,
)
from helix.worker.engines.torch_engine import TorchEngine, cache_argument  # noqa: E402
from helix.worker.tiny_model import BOS_ID, BYTE_VOCAB, EOS_ID, create_tiny_model  # noqa: E402

L = 8
PROMPTS = {"r0": [BOS_ID, 72, 101, 108], "r1": [BOS_ID, *range(40, 51)], "r2": [BOS_ID, 200, 13, 77, 9, 150, 3]}
NEW_TOKENS = 6

Reference = Callable[[Sequence[int], int], list[int]]


def make_reference(model_dir: Path, dtype: str | torch.dtype = torch.float64, **load: Any) -> Reference:
    """Greedy tokens of transformers' whole model, recomputing the full sequence for every token (no KV
    cache, no batching: it shares nothing with the engines); `load` goes to from_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **load).eval()
    memo: dict[tuple[int, ...], list[int]] = {}

    def greedy(prompt: Sequence[int], n: int) -> list[int]:
        key = (*prompt, -n)
        if key not in memo:
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(n):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            memo[key] = ids[len(prompt) :]
        return memo[key]

    return greedy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Sharded into several files with an index, as real checkpoints are.
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=3, num_layers=L, max_shard_size="150KB")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return make_reference(model_dir)


def load(model_dir: Path, start: int, end: int, kv_tokens: int = 4096, **kwargs: Any) -> TorchEngine:
    kwargs.setdefault("dtype", "float64")
    return TorchEngine.load(model_dir, start, end, kv_capacity_tokens=kv_tokens, **kwargs)


def serve(
    routes: dict[str, list[Engine]],
    prompts: dict[str, list[int]],
    n_new: int,
    start_tick: dict[str, int] | None = None,
    sampling: SamplingParams = GREEDY,
) -> dict[str, list[int]]:
    """A minimal worker loop: each tick every live request takes one step down its route; hops
    are batched per engine in waves, so a batch mixes requests of any phase and any upstream.
    Request k joins at tick start_tick[k]. Releases every request's KV at the end."""
    start_tick = start_tick or {}
    generated: dict[str, list[int]] = {rid: [] for rid in prompts}
    tick = 0
    while any(len(g) < n_new for g in generated.values()):
        pending: dict[str, tuple[int, StepInput]] = {}
        for rid, prompt in prompts.items():
            gen = generated[rid]
            if len(gen) >= n_new or tick < start_tick.get(rid, 0):
                continue
            if not gen:
                item = StepInput(rid, "prompt", range(len(prompt)), token_ids=prompt, sampling=sampling)
            else:
                item = StepInput(rid, "decode", [len(prompt) + len(gen) - 1], token_ids=[gen[-1]], sampling=sampling)
            pending[rid] = (0, item)
        while pending:
            groups: dict[int, list[str]] = {}
            for rid, (hop, _) in pending.items():
                groups.setdefault(id(routes[rid][hop]), []).append(rid)
            advanced: dict[str, tuple[int, StepInput]] = {}
            for rids in groups.values():
                hop0 = pending[rids[0]][0]
                engine = routes[rids[0]][hop0]
                outputs = engine.step([pending[rid][1] for rid in rids])
                assert [o.request_id for o in outputs] == rids
                for out in outputs:
                    hop, item = pending[out.request_id]
                    assert out.start_layer == (item.run_from_layer or engine.start_layer)
                    if hop == len(routes[out.request_id]) - 1:
                        assert (
                            out.end_layer == engine.num_layers
                            and out.hidden_states is None
                            and out.token_id is not None
                        )
                        generated[out.request_id].append(out.token_id)
                    else:
                        assert out.token_id is None and out.hidden_states is not None
                        hidden = out.hidden_states.cpu().clone()  # what crosses the wire
                        advanced[out.request_id] = (
                            hop + 1,
                            StepInput(
                                item.request_id,
                                item.phase,
                                item.positions,
                                hidden_states=hidden,
                                run_from_layer=out.end_layer,
                                sampling=item.sampling,
                            ),
                        )
            pending = advanced
        tick += 1
    for rid, route in routes.items():
        for engine in route:
            engine.release(rid)
    for engine in {id(e): e for route in routes.values() for e in route}.values():
        assert engine.kv_usage().used_token_layers == 0 and engine.kv_usage().num_requests == 0
    return generated


def test_registry_and_tokenizer(model_dir: Path) -> None:
    assert get_engine("torch") is TorchEngine
    assert {"torch", "vllm"} <= set(engine_names())
    with pytest.raises(EngineError, match="unknown engine"):
        get_engine("nope")
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Helix ✓ héllo"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and len(tok) == BYTE_VOCAB and tok.eos_token_id == EOS_ID
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )


@pytest.mark.parametrize("split", [[(0, 8)], [(0, 3), (3, 8)], [(0, 2), (2, 5), (5, 8)]], ids=["whole", "two", "three"])
def test_greedy_identical_across_splits(model_dir: Path, reference: Reference, split: list[tuple[int, int]]) -> None:
    engines: list[Engine] = [load(model_dir, a, b) for a, b in split]
    # Staggered starts: the batches mix one request's prompt with the others' decodes.
    out = serve(dict.fromkeys(PROMPTS, engines), PROMPTS, NEW_TOKENS, start_tick={"r0": 0, "r1": 1, "r2": 3})
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, NEW_TOKENS), rid


def test_eight_requests_of_different_lengths_batch_together(model_dir: Path, reference: Reference) -> None:
    """Every prefill and decode batch holds eight rows whose new-token runs and contexts all differ, so
    every layer call pads and masks; the cache kwarg transformers renamed in 5.20 once made exactly
    this fail (each row attended to its new tokens only: a shape error in SDPA)."""
    prompts = {f"c{i}": [BOS_ID, *range(30 + 7 * i, 30 + 7 * i + 3 * i + (i % 3))] for i in range(8)}
    assert len({len(p) for p in prompts.values()}) == 8
    engines: list[Engine] = [load(model_dir, 0, 3), load(model_dir, 3, 8)]
    sizes: list[int] = []
    step = engines[1].step

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        sizes.append(len(batch))
        return step(batch)

    engines[1].step = spy  # type: ignore[method-assign,unused-ignore]
    out = serve(dict.fromkeys(prompts, engines), prompts, NEW_TOKENS)
    assert sizes == [8] * NEW_TOKENS
    for rid, prompt in prompts.items():
        assert out[rid] == reference(prompt, NEW_TOKENS), rid


def test_layers_that_do_not_take_the_cache_are_refused(model_dir: Path) -> None:
    """A transformers release that renames the cache argument again fails loudly, never silently
    running attention without the KV."""

    class Renamed(torch.nn.Module):
        def forward(self, hidden_states: Any, attention_mask: Any = None, kv_store: Any = None, **kwargs: Any) -> Any:
            return hidden_states

    with pytest.raises(EngineError, match=r"Renamed\.forward takes none of cache, past_key_values"):
        cache_argument(Renamed())
    engine = load(model_dir, 0, 8)
    engine.cache_kwarg = "past_key_value"  # a name the layers only pass on in **kwargs, as the old code did
    with pytest.raises(EngineError, match="layer 0 did not use the KV cache passed as 'past_key_value'"):
        engine.step([StepInput("r", "prompt", range(3), token_ids=PROMPTS["r0"][:3])])


def test_partial_inference_on_overlapping_ranges(model_dir: Path, reference: Reference) -> None:
    a, b, c = load(model_dir, 0, 5), load(model_dir, 3, 8), load(model_dir, 0, 3)
    seen: list[set[int]] = []
    b_step = b.step

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        seen.append({item.run_from_layer or b.start_layer for item in batch})
        return b_step(batch)

    b.step = spy  # type: ignore[method-assign,unused-ignore]
    # r0, r2: A[0,5) then B[5,8) (partial); r1: C[0,3) then B[3,8) (whole range) — all meet in B's batches.
    routes: dict[str, list[Engine]] = {"r0": [a, b], "r1": [c, b], "r2": [a, b]}
    out = serve(routes, PROMPTS, NEW_TOKENS)
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, NEW_TOKENS), rid
    assert {3, 5} in seen  # one batch mixed both starting layers


def test_partial_inference_keeps_kv_only_for_layers_run(model_dir: Path) -> None:
    a, b = load(model_dir, 0, 5), load(model_dir, 3, 8)
    prompt = PROMPTS["r1"]
    hidden = a.step([StepInput("x", "prompt", range(len(prompt)), token_ids=prompt)])[0].hidden_states
    b.step([StepInput("x", "prompt", range(len(prompt)), hidden_states=hidden, run_from_layer=5)])
    assert b.kv_usage().used_token_layers == len(prompt) * 3  # layers 5, 6, 7 only
    assert b._requests["x"].extra.data.shape[0] == 3
    assert a.kv_usage().used_token_layers == len(prompt) * 5
    with pytest.raises(InvalidStepError, match="differs"):  # the same request cannot change its start layer
        b.step([StepInput("x", "decode", [len(prompt)], hidden_states=hidden[:1], run_from_layer=3)])


def test_chunked_prefill_batched_with_a_fresh_prompt(model_dir: Path, reference: Reference) -> None:
    # r1's prompt arrives in two chunks; the second (past 5, 7 new) shares a padded batch with r2's
    # whole prompt (past 0), so the mask must offset each row by its own past.
    route = [load(model_dir, 0, 4), load(model_dir, 4, L)]
    r1, r2 = PROMPTS["r1"], PROMPTS["r2"]

    def through(batch: list[StepInput]) -> list[int]:
        hidden = route[0].step(batch)
        nxt = [
            StepInput(i.request_id, i.phase, i.positions, hidden_states=h.hidden_states, run_from_layer=4)
            for i, h in zip(batch, hidden, strict=True)
        ]
        return [o.token_id for o in route[1].step(nxt) if o.token_id is not None]

    through([StepInput("r1", "prompt", range(5), token_ids=r1[:5])])
    tokens = through(
        [
            StepInput("r1", "prompt", range(5, len(r1)), token_ids=r1[5:]),
            StepInput("r2", "prompt", range(len(r2)), token_ids=r2),
        ]
    )
    assert tokens == [reference(r1, 1)[0], reference(r2, 1)[0]]


def test_release_frees_kv_and_full_cache_raises(model_dir: Path) -> None:
    engine = load(model_dir, 0, L, kv_tokens=20)  # 20 tokens on every layer = 160 token×layers
    assert engine.kv_usage().capacity_token_layers == 20 * L
    first = list(range(3, 15))  # 12 tokens
    engine.step([StepInput("a", "prompt", range(12), token_ids=first)])
    assert engine.kv_usage().used_token_layers == 12 * L and engine.kv_usage().allocated_bytes > 0
    second = StepInput("b", "prompt", range(10), token_ids=list(range(3, 13)))
    errors = engine.validate([second])
    assert isinstance(errors["b"], KVCacheFullError)
    with pytest.raises(KVCacheFullError) as info:
        engine.step([StepInput("a", "decode", [12], token_ids=[5]), second])
    assert (
        info.value.request_id == "b" and info.value.needed == 10 * L and info.value.free == 7 * L
    )  # after "a" took its token
    # Atomic: the request that fitted did not run either.
    assert engine.num_cached_tokens("a") == 12 and not engine.has_request("b")
    assert engine.idle_requests(3600) == [] and engine.idle_requests(-1) == ["a"]
    assert engine.release("a") and not engine.release("a")
    usage = engine.kv_usage()
    assert usage.used_token_layers == 0 and usage.allocated_bytes == 0 and usage.num_requests == 0
    engine.step([second])
    assert engine.kv_usage().used_tokens == 10


def test_restart_prompt_reprefills(model_dir: Path, reference: Reference) -> None:
    engine = load(model_dir, 0, L)
    prompt = PROMPTS["r2"]
    engine.step([StepInput("a", "prompt", range(3), token_ids=[BOS_ID, 9, 9])])
    engine.step([StepInput("a", "decode", [3], token_ids=[9])])
    # The router re-runs the request from scratch (e.g. after a failure elsewhere on its route).
    token = engine.step([StepInput("a", "prompt", range(len(prompt)), token_ids=prompt)])[0].token_id
    assert token == reference(prompt, 1)[0]
    assert engine.num_cached_tokens("a") == len(prompt)
    assert engine.kv_usage().used_token_layers == len(prompt) * L


def test_bad_steps_are_rejected(model_dir: Path) -> None:
    first, later = load(model_dir, 0, 4), load(model_dir, 4, L)
    hidden = torch.zeros(2, 64, dtype=torch.float64)
    cases: list[tuple[Engine, StepInput, type[EngineError]]] = [
        (first, StepInput("u", "decode", [3], token_ids=[5]), UnknownRequestError),
        (first, StepInput("u", "prompt", [0, 2], token_ids=[5, 6]), InvalidStepError),
        (first, StepInput("u", "prompt", [0, 1], token_ids=[5]), InvalidStepError),
        (first, StepInput("u", "prompt", [0], token_ids=[BYTE_VOCAB]), InvalidStepError),
        (first, StepInput("u", "prompt", [0, 1], hidden_states=hidden), InvalidStepError),
        (later, StepInput("u", "prompt", [0, 1], token_ids=[5, 6]), InvalidStepError),
        (later, StepInput("u", "prompt", [0, 1], hidden_states=hidden[:, :32]), InvalidStepError),
        (later, StepInput("u", "prompt", [0, 1], hidden_states=hidden, run_from_layer=2), InvalidStepError),
    ]
    for engine, item, error in cases:
        with pytest.raises(error):
            engine.step([item])
        assert engine.kv_usage().num_requests == 0
    first.step([StepInput("u", "prompt", [0, 1], token_ids=[5, 6])])
    with pytest.raises(InvalidStepError, match="cached"):
        first.step([StepInput("u", "decode", [5], token_ids=[5])])
    with pytest.raises(InvalidStepError, match="twice"):
        first.step([StepInput("v", "prompt", [0], token_ids=[5]), StepInput("v", "prompt", [0], token_ids=[5])])
    with pytest.raises(EngineError, match="layer range"):
        load(model_dir, 5, 9)


def test_a_device_or_config_the_engine_cannot_use_is_an_engine_error(model_dir: Path, tmp_path: Path) -> None:
    """Raised in the worker's load thread: anything but an EngineError reached its user as a traceback."""
    with pytest.raises(EngineError, match=r"unknown device 'bogus'; use cpu, cuda or cuda:N"):
        load(model_dir, 0, 2, device="bogus")
    with pytest.raises(EngineError, match="device 'cuda:99': "):
        load(model_dir, 0, 2, device="cuda:99")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text().replace('"llama"', '"nonsense"'))
    with pytest.raises(EngineError, match=r"transformers cannot read it: .*`nonsense`.* Fix config\.json"):
        load(tmp_path, 0, 2)


def test_loads_only_its_layers(model_dir: Path) -> None:
    middle = load(model_dir, 3, 5)
    assert {n.split(".")[2] for n in middle.loaded_weight_names} == {"3", "4"}
    assert all(n.startswith(("model.layers.3.", "model.layers.4.")) for n in middle.loaded_weight_names)
    assert middle.embed is None and middle.norm is None and middle.lm_head is None
    n_params = sum(p.numel() for layer in middle.layers.values() for p in layer.parameters())
    per_layer = sum(p.numel() for p in load(model_dir, 0, 1).layers[0].parameters())
    assert n_params == 2 * per_layer
    head = load(model_dir, 5, L)
    assert "lm_head.weight" in head.loaded_weight_names and "model.norm.weight" in head.loaded_weight_names
    assert "model.embed_tokens.weight" not in head.loaded_weight_names
    first = load(model_dir, 0, 2)
    assert "model.embed_tokens.weight" in first.loaded_weight_names and first.norm is None


def test_seeded_sampling_is_route_independent(model_dir: Path) -> None:
    sampling = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    whole_model: list[Engine] = [load(model_dir, 0, L)]
    whole = serve({rid: whole_model for rid in PROMPTS}, PROMPTS, NEW_TOKENS, sampling=sampling)
    split = [load(model_dir, 0, 5), load(model_dir, 3, L)]
    again = serve(dict.fromkeys(PROMPTS, split), PROMPTS, NEW_TOKENS, start_tick={"r1": 2}, sampling=sampling)
    assert whole == again
    other = serve(
        {rid: whole_model for rid in PROMPTS},
        PROMPTS,
        NEW_TOKENS,
        sampling=SamplingParams(temperature=0.9, top_p=0.9, seed=8),
    )
    assert other != whole


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_models(tmp_path: Path, architecture: str) -> None:
    # Qwen2: q/k/v biases, tied embeddings and sliding-window layers; Qwen3: q/k norms; Mistral: a
    # 4-token sliding window on every layer (shorter than the prompts, so the window masks really cut).
    model_dir = create_tiny_model(
        tmp_path / architecture,
        seed=1,
        num_layers=4,
        architecture=architecture,
        tie_word_embeddings=architecture != "mistral",
        sliding_window=4,
    )
    reference = make_reference(model_dir)
    route: list[Engine] = [load(model_dir, 0, 3), load(model_dir, 1, 4)]
    out = serve(dict.fromkeys(PROMPTS, route), PROMPTS, 4, start_tick={"r2": 1})
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, 4), (architecture, rid)


def test_eager_attention_and_float32(model_dir: Path, reference: Reference) -> None:
    eager: list[Engine] = [load(model_dir, 0, 4, attn_implementation="eager"), load(model_dir, 4, L)]
    out = serve(dict.fromkeys(PROMPTS, eager), PROMPTS, 3, start_tick={"r1": 1})
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, 3), rid
    f32 = load_engine("torch", model_dir, 0, 4, kv_capacity_tokens=64)  # default dtype on CPU: float32
    f64 = load(model_dir, 0, 4)
    assert f32.dtype == "float32"
    prompt = PROMPTS["r1"]
    h32 = f32.step([StepInput("a", "prompt", range(len(prompt)), token_ids=prompt)])[0].hidden_states
    h64 = f64.step([StepInput("a", "prompt", range(len(prompt)), token_ids=prompt)])[0].hidden_states
    assert h32 is not None and h64 is not None and h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), h64, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_shards(model_dir: Path, reference: Reference) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    route: list[Engine] = [load(model_dir, 0, 5, device="cuda"), load(model_dir, 3, L, device="cuda")]
    out = serve(dict.fromkeys(PROMPTS, route), PROMPTS, NEW_TOKENS, start_tick={"r1": 1})
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, NEW_TOKENS), rid
    bf16 = load_engine("torch", model_dir, 0, L, device="cuda")  # default on GPU: bfloat16, KV sized from memory
    assert bf16.dtype == "bfloat16" and bf16.kv_usage().capacity_tokens > 1000
    prompt = PROMPTS["r2"]
    token = bf16.step([StepInput("a", "prompt", range(len(prompt)), token_ids=prompt)])[0].token_id
    assert token is not None and 0 <= token < BYTE_VOCAB
