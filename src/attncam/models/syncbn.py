"""BatchNorm with batch statistics synchronised across processes, on any device (CPU/gloo too).

``torch.nn.SyncBatchNorm`` only runs on CUDA ("SyncBatchNorm expected input tensor to be on GPU"),
so under ``trainer=ddp`` on CPU every process used to normalise with the statistics of its own
shard of the batch, and N processes trained another model than one process with the same global
batch. :class:`DistributedBatchNorm` computes the statistics of the *global* batch with two
differentiable all-reduces (Ioffe & Szegedy 2015, Alg. 1, over the union of the shards):

1. per channel, the local sum and element count -> global mean ``mu = sum_r S_r / sum_r n_r``;
2. the local sum of squared deviations from ``mu`` -> global biased variance
   ``var = sum_r sum_i (x_i - mu)^2 / n`` (two passes, as ordinary BatchNorm computes it, rather
   than ``E[x^2] - mu^2``, which cancels catastrophically when ``|mu| >> std``).

The all-reduce is differentiable (:class:`_AllReduceSum`: its backward all-reduces the incoming
gradient, the adjoint of a sum over processes), so each process receives the exact gradient of the sum of all processes'
losses with respect to its inputs, and DDP's gradient averaging then yields the gradient of the
single-process loss on the global batch. Sums are reduced in float64: exact element counts far
beyond float32's 2**24, and the reduction order across processes barely matters.

Outside that case (eval mode, no initialised process group, world size 1) the layer runs
``_BatchNorm.forward`` unchanged, so it is bit-identical to ``nn.BatchNorm2d`` there. Parameter,
buffer names and shapes are those of ``nn.BatchNorm*d``: checkpoints written with synchronised
layers load into the plain network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "DistributedBatchNorm",
    "DistributedBatchNormPlugin",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``, differentiable: the gradient is summed likewise.

    The same as ``torch.distributed.nn.functional.all_reduce`` (deprecated in torch 2.x in favour
    of the private ``torch.distributed._functional_collectives``), kept here so that neither a
    deprecation warning per layer and step nor a private API is involved.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _world_size(group: Any) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over the union of every process's batch, for inputs ``(B, C, *)``, any device.

    Same arguments, parameters and buffers as ``nn.BatchNorm{1,2,3}d``, plus ``process_group``.
    In training mode with a process group of more than one process, mean and variance are those
    of the global batch (all processes' ``B`` together); ``running_mean`` and ``running_var``
    (unbiased, with the global element count) and ``num_batches_tracked`` then follow
    ``nn.BatchNorm2d``'s momentum rule, including ``momentum=None`` (cumulative average), and
    are the same on every process. Otherwise it is exactly ``nn.BatchNorm{1,2,3}d``.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: running-statistics factor; ``None`` for a cumulative average.
        affine: learn a per-channel ``weight`` and ``bias``.
        track_running_stats: keep ``running_mean`` / ``running_var``.
        process_group: the processes to synchronise over (``None``: all of them).
        device: parameter and buffer device.
        dtype: parameter and buffer dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        # The class convert_sync_batchnorm replaced, restored by revert_sync_batchnorm.
        self.original_class: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input (B, C, *) of 2 or more dims, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` ``(B, C, *)`` with the global batch's statistics when training.

        Raises:
            ValueError: fewer than 2 dims, or one value per channel in the global batch.
        """
        if not self.training or _world_size(self.process_group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return self._global_batch_norm(input, factor)

    def _global_batch_norm(self, input: Tensor, factor: float) -> Tensor:
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        # float32 statistics for half/bf16 inputs (as cuDNN), float64 stays float64.
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        local_count = input.numel() // max(channels, 1)

        # Pass 1: mean. Sum and count share one all-reduce; float64 keeps counts exact.
        local = torch.cat(
            [x.sum(dims).double(), x.new_full((1,), float(local_count), dtype=torch.float64)]
        )
        total = _AllReduceSum.apply(local, self.process_group)
        count = total[channels].detach()
        if local_count < 2 and float(count) < 2:  # a host sync only in this rare case
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of size "
                f"{list(input.shape)} and {int(count)} value(s) per channel over all processes"
            )
        mean = (total[:channels] / count).to(x.dtype)

        # Pass 2: biased variance about the global mean.
        centred = x - mean.view(shape)
        squares = _AllReduceSum.apply((centred * centred).sum(dims).double(), self.process_group)
        var = (squares / count).to(x.dtype)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)

        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None
            with torch.no_grad():
                unbiased = squares / (count - 1)  # same count on every process
                self.running_mean.mul_(1.0 - factor).add_(
                    mean.to(self.running_mean.dtype), alpha=factor
                )
                self.running_var.mul_(1.0 - factor).add_(
                    unbiased.to(self.running_var.dtype), alpha=factor
                )
        return y.to(input.dtype)


def _uninitialised(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and bool(
        module.has_uninitialized_params()
    )


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``_BatchNorm`` in ``module`` by a :class:`DistributedBatchNorm`.

    The new layers hold the *same* ``weight`` and ``bias`` parameters (so optimisers and
    ``requires_grad`` are unaffected) and the same buffers, and keep the training flag; the state
    dict's keys and shapes do not change. Forward hooks registered on the old layers are not
    carried over (as with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).

    Args:
        module: a network, or a single BatchNorm layer.
        process_group: the processes to synchronise over (``None``: all of them).

    Returns:
        ``module`` with its BatchNorm layers replaced (a new object if ``module`` itself is one).

    Raises:
        ValueError: a lazy BatchNorm whose shape is not known yet.
    """
    if isinstance(module, DistributedBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        if _uninitialised(module):
            raise ValueError(
                f"cannot synchronise an uninitialised {type(module).__name__}: run one forward "
                "pass first so that its number of features is known"
            )
        synced = DistributedBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        _move_state(module, synced)
        synced.original_class = type(module)
        return synced
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: each layer becomes its original BatchNorm class again.

    Returns:
        ``module`` with the same parameters, buffers and training flags, no synchronised layers.
    """
    if isinstance(module, DistributedBatchNorm):
        plain = module.original_class(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        _move_state(module, plain)
        return plain
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child)
        if reverted is not child:
            module.add_module(name, reverted)
    return module


def _move_state(source: _BatchNorm, target: _BatchNorm) -> None:
    """Give ``target`` the parameters, buffers, training flag and qconfig of ``source``."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        target.register_buffer(name, getattr(source, name), persistent=True)
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


class DistributedBatchNormPlugin(LayerSync):
    """Lightning plugin: :class:`DistributedBatchNorm` for every BatchNorm while fitting.

    Lightning applies it in ``strategy.setup`` before wrapping the model in DDP and reverts it at
    teardown. Pass it as ``Trainer(plugins=[DistributedBatchNormPlugin()])`` with
    ``sync_batchnorm=False`` (Lightning refuses both together). Unlike ``sync_batchnorm=True``
    (``torch.nn.SyncBatchNorm``) it also runs on CPU with gloo.

    Args:
        process_group: the processes to synchronise over (``None``: all of them).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        """Synchronise the BatchNorm layers of ``model``."""
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        """Restore the original BatchNorm layers of ``model``."""
        return revert_sync_batchnorm(model)
