"""`helix profile`: a real engine measured on this CPU, a file plan and simulate accept, one-line errors.

The grids are tiny (two points, one run each) so the tests take seconds; they check structure —
times positive and finite, the file round-trips, the planner and simulator read it — never speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from helix.cli.app import app  # noqa: E402
from helix.planner.cluster import GpuNode  # noqa: E402
from helix.planner.hf_config import resolve_model  # noqa: E402
from helix.planner.profiles.measured import MeasuredProfileFile, MeasuredProfiles  # noqa: E402
from helix.worker.profiling import Grid, kv_tokens_needed, resolve_source, write_random_shard  # noqa: E402
from helix.worker.tiny_model import create_tiny_model, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--prompt-tokens", "8,16", "--decode-batches", "1,2", "--contexts", "8,16", "--warmup", "0",
         "--repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module", autouse=True)
def keep_threads() -> Iterator[None]:
    """helix profile --threads sets torch's thread count for the process the CliRunner shares."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=1)


@pytest.fixture(scope="module")
def measured(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "cpu.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny), "--output", str(out), *QUICK])
    assert result.exit_code == 0, result.stderr or result.exception
    assert "[1/5] prompt 8 tokens" in result.stderr  # progress, one line per point
    assert "wrote profile to" in result.stdout
    return out


def test_the_file_holds_positive_times_and_the_configuration(measured: Path, tiny: Path) -> None:
    data = MeasuredProfileFile.load(measured)
    (label, entry), = data.gpus.items()
    assert label == "CPU" and entry.gpu == "CPU" and entry.gpu_count == 1
    times = [*entry.prompt.seconds_per_layer, *entry.decode.seconds_per_layer]
    assert all(t > 0 and math.isfinite(t) for t in times)
    assert entry.prompt.tokens == [8, 16] and entry.decode.batch == [1, 2]
    assert entry.decode.context_tokens_per_sequence == 8 and entry.decode.seconds_per_context_token >= 0
    assert entry.max_layers == 8 and entry.memory_budget_bytes and entry.memory_budget_bytes > 0
    on = data.measured_on
    assert on["dtype"] == "float32" and on["threads"] == 1 and on["layers_timed"] == 1
    assert on["engine"].startswith("torch") and on["torch"] == torch.__version__
    assert on["grid"]["repeats"] == 1 and on["memory"]["source"] == "MemAvailable in /proc/meminfo"
    assert [p["context_tokens_per_sequence"] for p in on["context_sweep"]] == [8, 16]
    assert data.model_shape == {k: v for k, v in resolve_model(str(tiny)).model_dump(exclude={"name"}).items()
                                if v is not None}
    # What the reader answers for a CPU node of this file: the measured points themselves.
    profiles = MeasuredProfiles(resolve_model(str(tiny)), data)
    node = GpuNode(name="n", gpu="cpu")
    assert profiles.prompt_layer_time(node, 16) == entry.prompt.seconds_per_layer[1]
    assert profiles.kv_capacity_tokens(node, 8) > 0 and profiles.throughput(node, 8) > 0


def test_plan_and_simulate_read_it(measured: Path, tiny: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    common = ["--mix", "CPU:3", "--model", str(tiny), "--profiles", str(measured)]
    result = CliRunner().invoke(app, ["plan", *common, "--time-limit", "1", "-o", str(plan), "-q"])
    assert result.exit_code == 0, result.stderr
    assert {n["gpu"] for n in json.loads(plan.read_text())["nodes"]} == {"CPU"}
    result = CliRunner().invoke(app, ["simulate", *common, "--plan", str(plan), "--duration", "5", "-q"])
    assert result.exit_code == 0, result.stderr


def test_a_different_dtype_is_a_different_model_shape(tiny: Path, tmp_path: Path) -> None:
    """The file records the dtype measured: a plan of the float32 model refuses a bfloat16 profile."""
    out = tmp_path / "bf16.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny), "-o", str(out), "--dtype", "bfloat16",
                                      "--quiet", *QUICK])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1 and "wrote" in result.stdout
    assert MeasuredProfileFile.load(out).model_shape["dtype"] == "bfloat16"
    result = CliRunner().invoke(app, ["plan", "--mix", "CPU:2", "--model", str(tiny), "--profiles", str(out), "-q"])
    assert result.exit_code == 2 and "different model shape: dtype='bfloat16'" in result.stderr


def test_a_config_without_weights_gets_random_weights_of_its_shapes(tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    tiny_config(num_layers=4, hidden=96, heads=3, kv_heads=1, intermediate=160).save_pretrained(str(folder))
    out = tmp_path / "random.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(folder), "-o", str(out), "--layers", "2", "-q",
                                      *QUICK])
    assert result.exit_code == 0, result.stderr
    data = MeasuredProfileFile.load(out)
    assert data.measured_on["weights"].endswith("(random weights)") and data.measured_on["layers_timed"] == 2
    assert data.model_shape is not None and data.model_shape["hidden_size"] == 96


def test_random_shard_holds_only_the_timed_layers(tmp_path: Path) -> None:
    """A catalog model's config at full size, but only layers [1, 2) written (no 128k-token embedding)."""
    source = resolve_source("llama3.1-8b")
    assert source.weights_dir is None and source.spec.name == "llama3.1-8b"
    config = source.hf_config
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads, config.vocab_size) == \
        (4096, 14336, 8, 128256)
    small = config.__class__.from_dict({**config.to_dict(), "hidden_size": 64, "intermediate_size": 96,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    folder = write_random_shard(small, tmp_path / "shard", 1, 2, torch.bfloat16, seed=0)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert index and all(name.startswith("model.layers.1.") for name in index)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 32


def test_kv_capacity_covers_the_largest_phase() -> None:
    grid = Grid(prompt_tokens=(100, 2000), decode_batches=(1, 8, 64), contexts=(1000, 3000), prompt_length=750)
    # decode: 64 requests of 1000 tokens + 4 runs × 3 batch sizes, rounded up to 256: 64 × 1024 (the largest)
    assert kv_tokens_needed(grid) == max(64 * 1024, 8 * 3072, 768 + 768 + 512)


@pytest.mark.parametrize(("args", "where"), [
    (["--model", "nope-70b"], "--model"),
    (["--layers", "7"], "--layers"),
    (["--layers", "0"], "--layers"),
    (["--prompt-tokens", "8,x"], "--prompt-tokens"),
    (["--prompt-tokens", "16"], "--prompt-tokens"),
    (["--decode-batches", "4,2"], "--decode-batches"),
    (["--contexts", "0,8"], "--contexts"),
    (["--repeats", "0"], "--repeats"),
    (["--dtype", "int8"], "--dtype"),
    (["--engine", "tensorrt"], "--engine"),
    (["--device", "tpu"], "--device"),
    (["--gpu", "B9000"], "--gpu"),
    (["--memory-utilization", "1.5"], "--memory-utilization"),
    (["--memory-bytes", "inf"], "--memory-bytes"),
    (["--output", "profile.yaml"], "--output"),
    (["--output", "no/such/folder/p.json"], "--output"),
])
def test_bad_input_is_one_line(args: list[str], where: str, tiny: Path, tmp_path: Path) -> None:
    model = [] if "--model" in args else ["--model", str(tiny)]
    output = [] if "--output" in args else ["--output", str(tmp_path / "p.json")]
    result = CliRunner().invoke(app, ["profile", *model, *output, *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {where}"), result.stderr
    assert not (tmp_path / "p.json").exists()


def test_moe_catalog_models_are_built_with_their_own_layers() -> None:
    """Mixtral's shapes as Mixtral (every layer MoE, experts as wide as intermediate_size), Qwen3's as Qwen3-MoE
    (experts of their own width): never the dense LLaMA layer of intermediate_size, which is not what they run."""
    mixtral = resolve_source("mixtral-8x7b").hf_config
    assert (mixtral.model_type, mixtral.num_local_experts, mixtral.num_experts_per_tok, mixtral.intermediate_size) == \
        ("mixtral", 8, 2, 14336)
    qwen = resolve_source("qwen3-30b-a3b").hf_config
    assert (qwen.model_type, qwen.num_local_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size,
            qwen.head_dim, qwen.mlp_only_layers) == ("qwen3_moe", 128, 8, 768, 128, [])


def test_a_random_moe_shard_holds_every_expert_and_its_dense_layers_stay_dense(tmp_path: Path) -> None:
    """Qwen3-30B-A3B's layout at a small size, layer 2 made dense: the shard written for layers [1, 3) holds
    layer 1's experts one tensor per expert and projection (as published checkpoints do) and layer 2's dense
    MLP, and the torch engine loads and runs it."""
    from helix.worker.engines import StepInput
    from helix.worker.engines.torch_engine import TorchEngine

    config = resolve_source("qwen3-30b-a3b").hf_config
    small = config.__class__.from_dict({**config.to_dict(), "hidden_size": 64, "intermediate_size": 96,
                                        "moe_intermediate_size": 32, "num_local_experts": 6, "num_experts_per_tok": 2,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                        "num_hidden_layers": 4, "mlp_only_layers": [2]})
    folder = write_random_shard(small, tmp_path / "shard", 1, 3, torch.float32, seed=0)
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert {n for n in names if ".experts." in n} == {f"model.layers.1.mlp.experts.{j}.{p}.weight"
                                                      for j in range(6) for p in ("gate_proj", "up_proj", "down_proj")}
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.2.mlp.gate_proj.weight" in names
    engine = TorchEngine.load(folder, 1, 3, kv_capacity_tokens=64)
    assert type(engine.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert type(engine.layers[2].mlp).__name__ == "Qwen3MoeMLP"
    (out,) = engine.step([StepInput("r", "prompt", range(5), hidden_states=torch.randn(5, 64))])
    assert out.hidden_states is not None and torch.isfinite(out.hidden_states).all()


def test_a_mixtral_config_is_profiled_with_its_experts(tmp_path: Path) -> None:
    folder = tmp_path / "mixtral-config"
    tiny_config("mixtral", num_layers=4, num_experts=4, experts_per_token=2).save_pretrained(str(folder))
    out = tmp_path / "moe.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(folder), "-o", str(out), "--layers", "2", "-q",
                                      *QUICK])
    assert result.exit_code == 0, result.stderr
    data = MeasuredProfileFile.load(out)
    assert data.model_shape is not None and data.model_shape["moe"]["num_experts"] == 4
    assert all(t > 0 for t in data.gpus["CPU"].decode.seconds_per_layer)


@pytest.mark.parametrize(("model", "what"), [
    ("deepseek-v3", "multi-head latent attention (deepseek_v3)"),
    ("llama4-scout", "shared experts beside the routed ones"),
    ("gpt-oss-120b", "sliding-window attention in mixture-of-experts layers (gpt_oss)"),
])
def test_moe_architectures_the_engines_cannot_build_are_refused(model: str, what: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "--model", model, "--output", str(tmp_path / "p.json")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --model: {model}: the engines cannot build its layers ({what}")


def test_the_refusal_comes_before_torch_is_imported() -> None:
    code = ("import sys\nfrom helix.planner.errors import HelixInputError\nfrom helix.worker.profiling import "
            "resolve_source\ntry:\n    resolve_source('deepseek-v3')\nexcept HelixInputError:\n"
            "    assert 'torch' not in sys.modules\nelse:\n    raise SystemExit('not refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
