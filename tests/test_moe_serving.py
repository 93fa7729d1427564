"""Mixture-of-experts models served in layer shards: token-identical to the whole model in one process.

Tiny random-weight Mixtral (every layer MoE, top-2 of 4 experts) and Qwen3-MoE (top-2 of 4, layer 2
dense) are split over shards and served through the engines' batching; the reference is transformers'
own `AutoModelForCausalLM` recomputing the whole sequence for every token. Engine-level tests run in
float64 (no argmax or router ties); the one end-to-end test serves a Mixtral pipeline of two workers
through `helix serve --local` in float32 and compares with the whole model in float32.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from helix.planner.plan import NodeAssignment, Plan  # noqa: E402
from helix.worker.engines import Engine, EngineError, StepInput, StepOutput, load_engine  # noqa: E402
from helix.worker.engines.torch_engine import TorchEngine  # noqa: E402
from helix.worker.engines.torch_loading import EXPERT_LAYOUTS  # noqa: E402
from helix.worker.tiny_model import BOS_ID, create_tiny_model  # noqa: E402
from tests.test_torch_engine import PROMPTS, make_reference, serve  # noqa: E402

L = 4
NEW_TOKENS = 5
QWEN_DENSE_LAYER = 2
STARTUP_S = 300.0
SPLITS = {"whole": [(0, 4)], "two": [(0, 2), (2, 4)], "three": [(0, 1), (1, 3), (3, 4)]}

Greedy = Callable[[Sequence[int], int], list[int]]


def whole_model(model_dir: Path, dtype: str) -> Greedy:
    """The whole model's greedy tokens; float64 needs the experts' eager loop: torch's grouped GEMM has no
    float64 kernel."""
    return make_reference(model_dir, dtype, experts_implementation="eager" if dtype == "float64" else "grouped_mm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Greedy]:
    """A tiny MoE model (sharded into several files, as real checkpoints are) and its whole-model greedy."""
    architecture = request.param
    dense = (QWEN_DENSE_LAYER,) if architecture == "qwen3_moe" else ()
    model_dir = create_tiny_model(tmp_path_factory.mktemp(architecture) / "model", seed=11, num_layers=L,
                                  architecture=architecture, dense_layers=dense, max_shard_size="100KB")
    return model_dir, whole_model(model_dir, "float64")


def load(model_dir: Path, start: int, end: int) -> TorchEngine:
    return TorchEngine.load(model_dir, start, end, dtype="float64", kv_capacity_tokens=4096)


def test_the_tiny_models_are_mixtures_of_experts_as_published(moe: tuple[Path, Greedy]) -> None:
    """Top-2 of 4 experts (Qwen's layer 2 dense), and the checkpoint laid out as published models are: one
    tensor per expert and projection, which the engines stack themselves."""
    model_dir, _ = moe
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    dense = [QWEN_DENSE_LAYER] if config.model_type == "qwen3_moe" else []
    assert getattr(config, "mlp_only_layers", []) == dense
    layout = EXPERT_LAYOUTS[config.model_type]
    names = {n for f in model_dir.glob("*.safetensors") for n in load_file(f)}
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    for layer in range(L):
        experts = {n for n in names if n.startswith(f"model.layers.{layer}.{layout.block}.experts.")}
        if layer in dense:
            assert not experts and f"model.layers.{layer}.mlp.gate_proj.weight" in names
        else:
            assert len(experts) == 4 * 3 and f"model.layers.{layer}.{layout.block}.gate.weight" in names


@pytest.mark.parametrize("split", list(SPLITS.values()), ids=list(SPLITS))
def test_greedy_identical_across_splits(moe: tuple[Path, Greedy], split: list[tuple[int, int]]) -> None:
    model_dir, greedy = moe
    engines: list[Engine] = [load(model_dir, a, b) for a, b in split]
    # Staggered starts: batches mix one request's prompt with the others' decodes.
    out = serve(dict.fromkeys(PROMPTS, engines), PROMPTS, NEW_TOKENS, start_tick={"r0": 0, "r1": 1, "r2": 3})
    for rid, prompt in PROMPTS.items():
        assert out[rid] == greedy(prompt, NEW_TOKENS), rid


def test_a_batch_of_different_lengths_and_partial_inference(moe: tuple[Path, Greedy]) -> None:
    """Six requests of six lengths in every batch (padded rows go through the router too, and must not
    change what the real rows get: routing is per token), over overlapping shards where some requests
    enter the tail at layer 1 and others at layer 3, in the same batches."""
    model_dir, greedy = moe
    prompts = {f"c{i}": [BOS_ID, *range(30 + 9 * i, 30 + 9 * i + 2 * i + 1)] for i in range(6)}
    head, short_head, tail = load(model_dir, 0, 3), load(model_dir, 0, 1), load(model_dir, 1, 4)
    seen: list[tuple[int, set[int]]] = []
    step = tail.step

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        seen.append((len(batch), {item.run_from_layer or tail.start_layer for item in batch}))
        return step(batch)

    tail.step = spy  # type: ignore[method-assign,unused-ignore]
    routes: dict[str, list[Engine]] = {rid: [head if i % 2 else short_head, tail] for i, rid in enumerate(prompts)}
    out = serve(routes, prompts, NEW_TOKENS)
    assert (6, {1, 3}) in seen  # every request in one batch, entering at both layers
    for rid, prompt in prompts.items():
        assert out[rid] == greedy(prompt, NEW_TOKENS), rid


def test_a_shard_reads_every_expert_of_its_layers_and_nothing_else(moe: tuple[Path, Greedy]) -> None:
    model_dir, _ = moe
    names = {n for f in model_dir.glob("*.safetensors") for n in load_file(f)}
    middle = load(model_dir, 1, 3)
    assert sorted(middle.loaded_weight_names) == sorted(n for n in names
                                                        if n.startswith(("model.layers.1.", "model.layers.2.")))
    experts = middle.layers[1].mlp.experts
    assert experts.gate_up_proj.shape[0] == 4 and experts.down_proj.shape[0] == 4


def test_a_checkpoint_missing_an_expert_is_refused(moe: tuple[Path, Greedy], tmp_path: Path) -> None:
    model_dir, _ = moe
    layout = EXPERT_LAYOUTS[json.loads((model_dir / "config.json").read_text())["model_type"]]
    tensors = {n: t for f in sorted(model_dir.glob("*.safetensors")) for n, t in load_file(f).items()}
    del tensors[f"model.layers.1.{layout.block}.experts.3.{layout.up}.weight"]
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(EngineError, match=r"layer 1: the checkpoint's experts are incomplete"):
        load(tmp_path, 0, 2)


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (on CPU: see docs/data-plane.md, the vllm engine)")


@needs_vllm
@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe"])
def test_vllm_shards_mixed_with_torch_equal_the_whole_model(architecture: str, tmp_path: Path) -> None:
    """vLLM's CPU fused-MoE path serves the same models: two vllm shards [0, 2) → [2, 4), and a torch head
    [0, 3) handing over to the vllm tail at layer 3 (partial inference), in the same batches. vLLM's CPU
    kernels run float32 with a head size of at least 32, hence the wider model; the reference is float64."""
    model_dir = create_tiny_model(tmp_path / architecture, seed=2, num_layers=L, hidden=128, heads=4,
                                  intermediate=256, expert_intermediate=128, architecture=architecture,
                                  dense_layers=(QWEN_DENSE_LAYER,) if architecture == "qwen3_moe" else ())
    greedy = whole_model(model_dir, "float64")
    head, tail = (load_engine("vllm", model_dir, a, b, kv_capacity_tokens=512, max_model_len=256)
                  for a, b in ((0, 2), (2, L)))
    torch_head = TorchEngine.load(model_dir, 0, 3, kv_capacity_tokens=512)
    starts: list[set[int]] = []
    step = tail.step

    def spy(batch: Sequence[StepInput]) -> list[StepOutput]:
        starts.append({item.run_from_layer for item in batch})
        return step(batch)

    tail.step = spy  # type: ignore[method-assign,unused-ignore]
    try:
        routes: dict[str, list[Engine]] = {"r0": [head, tail], "r1": [torch_head, tail], "r2": [head, tail]}
        out = serve(routes, PROMPTS, NEW_TOKENS, start_tick={"r2": 1})
    finally:
        head.close()
        tail.close()
    assert {2, 3} in starts
    for rid, prompt in PROMPTS.items():
        assert out[rid] == greedy(prompt, NEW_TOKENS), (architecture, rid)


@pytest.mark.e2e
@pytest.mark.slow
def test_helix_serve_local_pipelines_a_mixtral_over_two_workers(tmp_path: Path) -> None:
    """`helix serve --local` (a real router and two worker processes on loopback) serves a tiny Mixtral split
    head [0, 2) → tail [2, 4); three concurrent greedy completions of different lengths (batched on both
    workers) equal transformers' whole model in float32, the workers' dtype."""
    model_dir = create_tiny_model(tmp_path / "mixtral", seed=5, num_layers=L, architecture="mixtral")
    Plan(model="mixtral", num_layers=L, method="test", objective_tokens_per_s=0.0,
         nodes=[NodeAssignment(name="head", gpu="cpu", start_layer=0, end_layer=2),
                NodeAssignment(name="tail", gpu="cpu", start_layer=2, end_layer=L)]).save(tmp_path / "plan.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    greedy = whole_model(model_dir, "float32")
    prompts = ["Mixture of", "experts route each token", "x" * 30]
    log = tmp_path / "serve.err"
    cmd = [sys.executable, "-m", "helix.cli.app", "serve", "--local", "--model", str(model_dir), "--plan",
           str(tmp_path / "plan.json"), "--port", "0", "--threads", "1"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    # A safety net, not a timing: start-up on a loaded machine can take minutes; a hang must still end.
    watchdog = threading.Timer(STARTUP_S, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        assert proc.stdout is not None
        serving = next((line for line in proc.stdout if line.startswith("serving ")), None)
        assert serving is not None, log.read_text()[-3000:]
        url = json.loads(serving.removeprefix("serving "))["url"]

        def complete(prompt: str, n: int) -> dict[str, Any]:
            body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}).encode()
            request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return dict(json.load(response))

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(complete, prompts, [4 + 2 * i for i in range(len(prompts))]))
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        want = tokenizer.decode(greedy(tokenizer(prompt)["input_ids"], 4 + 2 * i), skip_special_tokens=True)
        assert answer["choices"][0]["text"] == want and answer["usage"]["completion_tokens"] == 4 + 2 * i, prompt
    assert proc.returncode == 0, log.read_text()[-3000:]
