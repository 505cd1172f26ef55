"""Several workers per GPU, checked without one: the environment each local worker gets, the
memory share the feasibility check then uses, and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexunet import config as cfg
from flexunet import devices
from search.runtime import run as runner
from search.spec import space as sp
from search.spec.study_file import Budget
from tests.conftest import assert_user_error, run_cli

H200_MIB = 143771.0  # nvidia-smi's memory.total of the H200 in BENCHMARKS.md section 6


def test_two_workers_on_gpu_0_share_its_memory() -> None:
    envs = [runner.worker_env(i, 2, ("0",), {"0": H200_MIB}) for i in range(2)]
    for env in envs:
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env[devices.JAX_FRACTION_ENV] == "0.450"
        assert env[devices.GPU_MEMORY_ENV] == str(int(H200_MIB * 0.45))
        assert float(env[sp.MEMORY_ENV]) == pytest.approx(H200_MIB * 0.45 / 1024, abs=0.01)


def test_round_robin_gives_each_gpu_its_own_count() -> None:
    # Five workers over two GPUs: three on GPU 0, two on GPU 1, each share sized by its GPU's count.
    envs = [runner.worker_env(i, 5, ("0", "1"), {"0": 80000.0, "1": 40000.0}) for i in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "0"]
    assert [e[devices.JAX_FRACTION_ENV] for e in envs] == ["0.300", "0.450", "0.300", "0.450", "0.300"]
    assert [e[devices.GPU_MEMORY_ENV] for e in envs] == ["24000", "18000", "24000", "18000", "24000"]


def test_an_unreadable_gpu_gets_a_fraction_but_no_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sp.MEMORY_ENV, raising=False)
    monkeypatch.delenv(devices.GPU_MEMORY_ENV, raising=False)
    env = runner.worker_env(1, 4, ("3",), {})
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env[devices.JAX_FRACTION_ENV] == "0.225"
    assert devices.GPU_MEMORY_ENV not in env and sp.MEMORY_ENV not in env


def test_nvidia_smi_memory_lines() -> None:
    text = "0, 143771\n1, 81559\nNo devices were found\n"
    assert devices.parse_memory(text) == {"0": 143771.0, "1": 81559.0}


def test_feasibility_uses_the_gpu_share(monkeypatch: pytest.MonkeyPatch, prepared64: Path) -> None:
    base = cfg.load(prepared64 / "train_eval_infer.config")
    big = cfg.override(base, "model", {"image_width": 512, "image_height": 512, "num_layers": 7,
                                       "base_filters": 64}, "test")
    big = cfg.override(big, "train", {"batch_size": 16}, "test")
    # About 52 GiB to train: it fits half of an H200 but not a quarter.
    two = runner.worker_env(0, 2, ("0",), {"0": H200_MIB})
    four = runner.worker_env(0, 4, ("0",), {"0": H200_MIB})
    monkeypatch.setenv(sp.MEMORY_ENV, two[sp.MEMORY_ENV])
    assert sp.infeasible(big, Budget()) is None
    monkeypatch.setenv(sp.MEMORY_ENV, four[sp.MEMORY_ENV])
    reason = sp.infeasible(big, Budget())
    assert reason is not None and "this worker's memory share" in reason and f"({four[sp.MEMORY_ENV]} GiB)" in reason


def test_workers_per_gpu_needs_gpus(tmp_path: Path) -> None:
    study = Path(__file__).resolve().parents[1] / "studies" / "ct_ich_sample.toml"
    assert_user_error(run_cli("search", "run", study, "--workers-per-gpu", "2", "--out", tmp_path / "o"),
                      "--workers-per-gpu 2", "--gpus")
    assert_user_error(run_cli("search", "run", study, "--workers-per-gpu", "2", "--gpus", "0", "--workers", "3",
                              "--out", tmp_path / "o"), "--workers or --workers-per-gpu")
    assert not (tmp_path / "o").exists()
