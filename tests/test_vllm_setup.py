"""#25: opd's rules for building and feeding vLLM engines, checked on CPU without vLLM.

The engine tests put a small stand-in `vllm` package in `sys.modules` (an `LLM` that records how it
was built and runs a real torch model as its "worker model"), so opd's own code paths run as they
would against vLLM 0.33: the environment it sets, the arguments it passes, how weights reach the
engine and what it refuses.
"""

import dataclasses
import logging
import os
import sys
import threading
import tomllib
import types
from pathlib import Path

import pytest
import torch

from opd import vllm_setup
from opd.config import load_config
from opd.models import load_model
from opd.rollout import make_rollout_engine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_multiprocessing_setting(monkeypatch):
    """Each test starts with VLLM_ENABLE_V1_MULTIPROCESSING unset, and what opd sets is undone afterwards."""
    monkeypatch.setenv(vllm_setup.MULTIPROCESSING, "")  # records the original value for the restore
    monkeypatch.delenv(vllm_setup.MULTIPROCESSING)


class Worker:
    """What `collective_rpc("reload_weights", ...)` reaches: new vLLM takes weights, old takes none."""

    def __init__(self, model: torch.nn.Module, takes_weights: bool):
        self.model, self.takes_weights, self.reloads = model, takes_weights, 0

    def reload_weights(self, weights_iterator=None, is_checkpoint_format=True):
        if not self.takes_weights:
            raise TypeError("Worker.reload_weights() got an unexpected keyword argument 'weights_iterator'")
        assert is_checkpoint_format
        self.model.load_state_dict(dict(weights_iterator))
        self.reloads += 1


def fake_vllm(monkeypatch, takes_weights=True, quantization=None, multiprocessing_frozen=None):
    """A stand-in `vllm` (version 0.33.0); returns the list of engines it builds."""
    built = []

    class LLM:
        def __init__(self, model, **kwargs):
            self.kwargs, self.env = kwargs, os.environ.get(vllm_setup.MULTIPROCESSING)
            self.model = load_model("tiny:student")
            with torch.no_grad():
                for p in self.model.parameters():
                    p.zero_()  # so that a weight sync is visible
            self.model.load_weights = self._load_weights  # vLLM models load (hf_name, tensor) pairs
            self.worker = Worker(self.model, takes_weights)
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
                quantization=quantization, max_model_len=512, logprobs_mode=kwargs.get("logprobs_mode",
                                                                                       "raw_logprobs")))
            self.prefix_resets = 0
            built.append(self)

        def _load_weights(self, weights):
            self.model.load_state_dict(dict(weights))
            return {name for name, _ in weights}

        def collective_rpc(self, method, kwargs=None):
            return [getattr(self.worker, method)(**(kwargs or {}))]

        def apply_model(self, fn):
            return [fn(self.model)]

        def reset_prefix_cache(self):
            self.prefix_resets += 1

    class SamplingParams:
        def __init__(self, top_k: int = 0, **kwargs):
            self.top_k, self.kwargs = top_k, kwargs

    @dataclasses.dataclass
    class EngineArgs:
        logprobs_mode: str = "raw_logprobs"

    vllm = types.ModuleType("vllm")
    vllm.__version__, vllm.LLM, vllm.SamplingParams = "0.33.0", LLM, SamplingParams
    engine, arg_utils, envs = (types.ModuleType(n) for n in ("vllm.engine", "vllm.engine.arg_utils", "vllm.envs"))
    arg_utils.EngineArgs = EngineArgs
    envs.__getattr__ = lambda name: (multiprocessing_frozen if multiprocessing_frozen is not None
                                     else os.environ.get(name, "1") not in ("0", "false"))
    for name, module in (("vllm", vllm), ("vllm.engine", engine), ("vllm.engine.arg_utils", arg_utils),
                         ("vllm.envs", envs)):
        monkeypatch.setitem(sys.modules, name, module)
    return built


def changed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    return model


# ---- 1. the engine runs in-process, set once ---------------------------------------------------------------------


def test_multiprocessing_is_set_to_0_once_and_not_restored(monkeypatch, tokenizer, student):
    built = fake_vllm(monkeypatch)
    from opd.rollout.vllm import VLLMRolloutEngine

    VLLMRolloutEngine(student, tokenizer)
    VLLMRolloutEngine(student, tokenizer)
    assert [e.env for e in built] == ["0", "0"]  # the second engine sees what the first did
    assert os.environ[vllm_setup.MULTIPROCESSING] == "0"  # left set: vLLM's env cache is frozen anyway


def test_a_user_set_multiprocessing_1_is_refused_for_rollouts_and_allowed_for_a_teacher(monkeypatch, tokenizer):
    monkeypatch.setenv(vllm_setup.MULTIPROCESSING, "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING='1'.*set it to 0"):
        vllm_setup.engines_in_process(True)
    vllm_setup.engines_in_process(False)  # a teacher engine may run in its own process
    monkeypatch.setenv(vllm_setup.MULTIPROCESSING, "0")
    with pytest.raises(ValueError, match="already froze .* build opd's engines first"):
        vllm_setup.engines_in_process(True, read_frozen=lambda: True)  # an engine built earlier with =1
    fake_vllm(monkeypatch, multiprocessing_frozen=True)
    from opd.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ValueError, match="already froze"):
        VLLMRolloutEngine("some/folder", tokenizer)


# ---- 2. torchrun with > 1 process ----------------------------------------------------------------------------------


def test_one_external_launcher_engine_per_torchrun_rank(monkeypatch, tokenizer, student):
    assert vllm_setup.engine_kwargs(5, 1, {}) == {"seed": 5}
    assert vllm_setup.engine_kwargs(5, 4, {}) == {"seed": 5, "distributed_executor_backend": "external_launcher",
                                                   "tensor_parallel_size": 1}
    with pytest.raises(ValueError, match="tensor_parallel_size=2 under torchrun"):
        vllm_setup.engine_kwargs(5, 4, {"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="distributed_executor_backend='mp' under torchrun"):
        vllm_setup.engine_kwargs(5, 4, {"distributed_executor_backend": "mp"})
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    built = fake_vllm(monkeypatch)
    from opd.rollout.vllm import VLLMRolloutEngine

    VLLMRolloutEngine(student, tokenizer)
    assert built[0].kwargs["distributed_executor_backend"] == "external_launcher"


# ---- 3. temperature > 2 ---------------------------------------------------------------------------------------------


def test_a_temperature_vllm_would_reject_is_refused_in_the_config():
    assert load_config(None, ["rollout_backend=vllm", "temperature=2.0"]).temperature == 2.0
    with pytest.raises(ValueError, match=r"temperature \(rollout_backend=vllm\).*\(0, 2\].*rollout_backend=hf"):
        load_config(None, ["rollout_backend=vllm", "temperature=2.5"])
    assert load_config(None, ["temperature=2.5"]).temperature == 2.5  # the HF sampler takes any τ > 0


# ---- 4. the run's seed ----------------------------------------------------------------------------------------------


def test_the_runs_seed_reaches_the_engines(monkeypatch, tokenizer, student):
    built = fake_vllm(monkeypatch)
    make_rollout_engine("vllm", student, tokenizer, seed=7)
    from opd.teacher import make_teacher_scorer

    make_teacher_scorer("vllm", "tiny:teacher", seed=7, dtype="float32")
    assert [e.kwargs["seed"] for e in built] == [7, 7]
    assert built[1].kwargs["dtype"] == "float32" and built[1].kwargs["enable_prefix_caching"] is False


# ---- 5. several teacher engines -------------------------------------------------------------------------------------


def test_several_teacher_engines_run_one_after_another_on_the_callers_thread(monkeypatch):
    from opd.teacher.vllm import VLLMTeacherScorer

    calls, busy = [], []

    class Engine:
        def __init__(self, name):
            self.name = name
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
                max_model_len=64, logprobs_mode="raw_logprobs", max_logprobs=20))

        def generate(self, prompts, params, use_tqdm):
            assert not busy, "two engines ran at once"
            busy.append(self.name)
            calls.append((self.name, threading.get_ident(), len(prompts)))
            busy.pop()
            return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                          outputs=[types.SimpleNamespace(token_ids=[7, 2])]) for p in prompts]

    fake_vllm(monkeypatch)
    scorer = VLLMTeacherScorer(None, llms=[Engine("a"), Engine("b")])
    traces = scorer.generate_greedy([[1, 3], [1, 4], [1, 5, 5, 5, 5]], max_new_tokens=4)
    assert traces == [[7, 2]] * 3
    assert [(name, n) for name, _, n in calls] == [("a", 2), ("b", 1)]  # contiguous parts by tokens, in order
    assert {thread for _, thread, _ in calls} == {threading.get_ident()}
    with pytest.raises(ValueError, match="topk=21 exceeds the teacher engine's max_logprobs=20"):
        from opd.types import Rollout
        scorer.score([Rollout([1, 3], [5], [-1.0], "length", 0)], 1.0, topk=21)


# ---- 6. weight sync -------------------------------------------------------------------------------------------------


def test_weights_sync_through_reload_weights_and_reach_the_engine_model(monkeypatch, tokenizer, student):
    built = fake_vllm(monkeypatch)
    from opd.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(student, tokenizer)
    engine.load_weights(changed(student))
    assert engine.sync_path == "reload_weights" and built[0].worker.reloads == 2 and built[0].prefix_resets == 2
    for (name, want), got in zip(student.state_dict().items(), built[0].model.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def test_older_vllm_falls_back_to_apply_model_with_the_every_parameter_check(monkeypatch, tokenizer, student):
    built = fake_vllm(monkeypatch, takes_weights=False)
    from opd.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(student, tokenizer)
    assert engine.sync_path == "apply_model"
    assert torch.equal(built[0].model.lm_head.weight, student.lm_head.weight)
    model = built[0].model
    model.load_weights = lambda weights: {n for n, _ in weights} - {"model.norm.weight"}  # one left unwritten
    with pytest.raises(RuntimeError, match="left 1 vLLM parameters unwritten, e.g. \\['model.norm.weight'\\]"):
        engine.load_weights(student)


def test_a_quantized_engine_syncs_only_through_reload_weights(monkeypatch, tokenizer, student):
    built = fake_vllm(monkeypatch, quantization="fp8")
    from opd.rollout.vllm import VLLMRolloutEngine

    assert VLLMRolloutEngine(student, tokenizer).sync_path == "reload_weights"  # no name check to false-alarm
    assert built[0].worker.reloads == 1
    fake_vllm(monkeypatch, takes_weights=False, quantization="fp8")
    with pytest.raises(RuntimeError, match="cannot reload weights into a quantized engine"):
        VLLMRolloutEngine(student, tokenizer)


# ---- 7. the version range -------------------------------------------------------------------------------------------


def test_the_version_range_is_enforced_and_matches_the_extra(caplog):
    with pytest.raises(ImportError, match=r"vllm 0.10.1 is older than opd supports; install `vllm>=0.11,<0.34`"):
        vllm_setup.check_vllm_version("0.10.1")
    vllm_setup.check_vllm_version("0.33.0")
    with caplog.at_level(logging.WARNING, logger="opd.vllm_setup"):
        vllm_setup.check_vllm_version("0.34.0rc1")
    assert "newer than the range" in caplog.text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extras[0] == vllm_setup.VLLM_RANGE


def test_the_gpu_check_script_exits_cleanly_without_vllm_or_cuda():
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_vllm.py")], capture_output=True,
                            text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would run the check itself")
    assert result.returncode == 3, result.stderr
    assert "skipped" in result.stdout and ("vllm" in result.stdout.lower())
