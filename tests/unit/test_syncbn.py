"""DistributedBatchNorm (issue 7): global-batch statistics across processes on CPU (gloo).

Two processes that each hold half of a batch must produce what one ``nn.BatchNorm{1,2}d`` produces
on the whole batch: outputs, input gradients, weight/bias gradients (summed over processes, which
DDP averages), running statistics. Outside distributed training the layer is ``nn.BatchNorm2d``
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from attncam.models.lit_module import ClassifierModule, load_classifier
from attncam.models.syncbn import (
    DistributedBatchNorm,
    DistributedBatchNormPlugin,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)


@dataclass(frozen=True)
class Case:
    """One layer, its input shape and dtype, and how the batch is split over 2 processes."""

    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    dtype: torch.dtype
    split: tuple[int, int]
    offset: float
    tol: float  # on ||actual - expected|| / ||expected||


def _bn2d(**kw: Any) -> Callable[[], nn.Module]:
    return lambda: _affine(nn.BatchNorm2d(3, **kw))


def _affine(bn: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(bn.bias.shape, generator=g) - 0.5)
    return bn


CASES: dict[str, Case] = {
    "bn2d_float32_even": Case(_bn2d(), (8, 3, 5, 5), torch.float32, (4, 4), 3.0, 1e-6),
    # A mean of 1e4 with std 2: E[x^2] - mean^2 would lose 8 of float64's 16 digits.
    "bn2d_float64_uneven_cumulative": Case(
        _bn2d(momentum=None), (8, 3, 5, 5), torch.float64, (5, 3), 1e4, 1e-11
    ),
    "bn1d_float32": Case(lambda: _affine(nn.BatchNorm1d(6)), (8, 6), torch.float32, (4, 4), 3.0, 1e-6),
}  # fmt: skip
STEPS = 3


def _run(bn: nn.Module, case: Case, rows: slice) -> dict[str, list[Tensor]]:
    """``STEPS`` training steps on ``rows`` of seeded batches, then one eval forward."""
    rec: dict[str, list[Tensor]] = {k: [] for k in ("y", "grad_x", "grad_w", "grad_b", "stats")}
    bn.train()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        x_full = torch.randn(case.shape, generator=g, dtype=case.dtype) * 2.0 + case.offset
        upstream = torch.randn(case.shape, generator=g, dtype=case.dtype)
        x = x_full[rows].clone().requires_grad_(True)
        bn.zero_grad(set_to_none=True)
        y = bn(x.to(case.dtype))
        (y * upstream[rows]).sum().backward()
        rec["y"].append(y.detach())
        rec["grad_x"].append(x.grad)  # type: ignore[arg-type]
        rec["grad_w"].append(bn.weight.grad)  # type: ignore[arg-type]
        rec["grad_b"].append(bn.bias.grad)  # type: ignore[arg-type]
        rec["stats"] += [
            bn.running_mean.clone(),  # type: ignore[union-attr]
            bn.running_var.clone(),  # type: ignore[union-attr]
            bn.num_batches_tracked.clone(),  # type: ignore[union-attr]
        ]
    bn.eval()
    with torch.no_grad():
        rec["eval"] = [bn(x_full[rows])]
    return rec


def _cast(case: Case, bn: nn.Module) -> nn.Module:
    return bn.to(case.dtype)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Every process must create every group; each then uses its own one-process group.
        alone = [dist.new_group([r]) for r in range(world)][rank]
        results: dict[str, Any] = {}
        for name, case in CASES.items():
            start = sum(case.split[:rank])
            rows = slice(start, start + case.split[rank])
            synced = convert_sync_batchnorm(_cast(case, case.make()))
            results[name] = _run(synced, case, rows)
            single = convert_sync_batchnorm(_cast(case, case.make()), process_group=alone)
            plain = _cast(case, case.make())
            results[f"{name}/alone"] = (_run(single, case, rows), _run(plain, case, rows))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case run by 2 gloo processes, each on its part of the batch."""
    tmp = tmp_path_factory.mktemp("syncbn")
    # fork (where there is one) spares each process re-importing torch and Lightning: seconds.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(2, str(tmp / "store"), str(tmp)), nprocs=2, join=True, start_method=method
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_all_equal(a: dict[str, list[Tensor]], b: dict[str, list[Tensor]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for i, (u, v) in enumerate(zip(a[key], b[key], strict=True)):
            assert u.dtype == v.dtype and torch.equal(u, v), f"{key}[{i}] differs"


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_batchnorm_on_the_whole_batch(
    two_processes: list[dict[str, Any]], name: str
) -> None:
    case = CASES[name]
    ref = _run(_cast(case, case.make()), case, slice(None))
    ranks = [r[name] for r in two_processes]

    def close(actual: Tensor, expected: Tensor, what: str) -> None:
        # Relative to the tensor's norm: elements near 0 carry the rounding of the large ones.
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), what
            return
        error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
        assert error <= case.tol, f"{what}: relative error {error:.3g} > {case.tol:g}"

    for step in range(STEPS):
        for key in ("y", "grad_x"):
            cat = torch.cat([r[key][step] for r in ranks])
            close(cat, ref[key][step], f"{key} step {step}")
        for key in ("grad_w", "grad_b"):
            close(sum(r[key][step] for r in ranks), ref[key][step], f"{key} step {step}")
    for r, rank in enumerate(ranks):
        for i, (got, want) in enumerate(zip(rank["stats"], ref["stats"], strict=True)):
            close(got, want, f"rank {r} running stats {i}")
    close(torch.cat([r["eval"][0] for r in ranks]), ref["eval"][0], "eval output")


@pytest.mark.parametrize("name", list(CASES))
def test_a_one_process_group_is_plain_batchnorm_bit_for_bit(
    two_processes: list[dict[str, Any]], name: str
) -> None:
    for rank in two_processes:
        synced, plain = rank[f"{name}/alone"]
        _assert_all_equal(synced, plain)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_it_is_batchnorm2d_bit_for_bit(momentum: float | None) -> None:
    case = Case(_bn2d(momentum=momentum), (6, 3, 4, 4), torch.float32, (3, 3), 3.0, 0.0)
    synced = convert_sync_batchnorm(case.make())
    assert isinstance(synced, DistributedBatchNorm)
    _assert_all_equal(_run(synced, case, slice(None)), _run(case.make(), case, slice(None)))


def test_convert_and_revert_keep_parameters_buffers_and_flags(tmp_path: Path) -> None:
    module = ClassifierModule(backbone="tiny", num_classes=3, attention="bam")
    module.net.features.bn1.eval()
    module.net.features.bn1.weight.requires_grad_(False)
    before = module.state_dict()
    params = dict(module.named_parameters())
    flags = {n: m.training for n, m in module.named_modules()}
    classes = {n: type(m) for n, m in module.named_modules()}
    norms = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(classes[n] is nn.BatchNorm1d for n in norms), "BAM's BatchNorm1d is covered"

    synced = DistributedBatchNormPlugin().apply(module)
    assert synced is module
    for n in norms:
        assert isinstance(module.get_submodule(n), DistributedBatchNorm), n
    state = module.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(p is params[n] for n, p in module.named_parameters())
    assert not module.net.features.bn1.weight.requires_grad
    assert {n: m.training for n, m in module.named_modules()} == flags

    # A checkpoint saved from the synchronised model loads into the plain one.
    ckpt = tmp_path / "synced.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, ckpt)
    loaded = load_classifier(str(ckpt))
    assert not any(isinstance(m, DistributedBatchNorm) for m in loaded.modules())
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    DistributedBatchNormPlugin().revert(module)
    assert {n: type(m) for n, m in module.named_modules()} == classes
    assert all(p is params[n] for n, p in module.named_parameters())
    assert {n: m.training for n, m in module.named_modules()} == flags
    assert list(module.state_dict()) == list(before)


def test_bad_input_fails_clearly() -> None:
    bn = DistributedBatchNorm(3)
    with pytest.raises(
        ValueError, match="expected an input \\(B, C, \\*\\) of 2 or more dims, got 1D"
    ):
        bn(torch.zeros(3))
    with pytest.raises(ValueError, match="uninitialised LazyBatchNorm2d"):
        convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    assert revert_sync_batchnorm(nn.Linear(2, 2)).__class__ is nn.Linear


def test_trainer_sync_batchnorm_key_selects_the_plugin() -> None:
    from attncam.stages.common import AtomicCheckpointIO, trainer_plugins

    kwargs = {"sync_batchnorm": True, "devices": 2}
    plugins = trainer_plugins(kwargs)
    assert kwargs == {"devices": 2}, "the key is not passed on to Trainer"
    assert [type(p) for p in plugins] == [AtomicCheckpointIO, DistributedBatchNormPlugin]
    assert [type(p) for p in trainer_plugins({"sync_batchnorm": False})] == [AtomicCheckpointIO]
    with pytest.raises(ValueError, match="unknown trainer.sync_batchnorm 'torch'; choose one of"):
        trainer_plugins({"sync_batchnorm": "torch"})
