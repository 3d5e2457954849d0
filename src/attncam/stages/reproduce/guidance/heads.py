"""The arms of the guidance experiment: one frozen trunk, a trained tail per arm and seed.

An arm is a recipe: where the attention sits (``placement``), its spatial-BN ``gamma``
initialisation (0 in the official CBAM code; 1 widens the gate), whether its parameters get weight
decay and a larger learning rate, whether the spatial gate is held at its initial value (the
untrained-attention control), whether the labels are shuffled (Adebayo et al.'s data
randomisation), or no attention at all (the plain network). The trunk (the ImageNet
EfficientNet-Lite0 up to the layer the tail starts from) is frozen; the tail is trained on its
cached features, so a seed costs seconds and every arm sees exactly the same trunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attncam.io import atomic_torch_save
from attncam.models.net import AFTER, AttentionNet
from attncam.runtime import eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One recipe (see the module docstring)."""

    name: str
    attention: str = "cbam"
    placement: str = "last"
    gamma: float = 0.0
    attention_lr_mult: float = 1.0
    attention_weight_decay: bool = True
    freeze_spatial: bool = False
    shuffle_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, options: DictConfig | dict[str, Any] | None) -> Arm:
        raw = (
            OmegaConf.to_container(options, resolve=True)
            if isinstance(options, DictConfig)
            else options
        )
        opts = dict(raw or {})  # type: ignore[arg-type]
        unknown = sorted(set(opts) - set(ARM_DEFAULTS) - {"seeds", "role"})
        if unknown:
            raise ValueError(
                f"guidance.arms.{name}: unknown keys {unknown}; valid: {sorted(ARM_DEFAULTS)}, "
                "seeds, role"
            )
        extra = {k: opts.pop(k) for k in ("seeds", "role") if k in opts}
        return cls(name=name, extra=extra, **opts)

    @property
    def has_attention(self) -> bool:
        return self.attention != "none"


#: Recipe keys an arm may set, with their defaults (the dataclass's; ``guidance.arms.<name>``).
ARM_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Arm) if f.name not in ("name", "extra")
}


def build_net(arm: Arm, backbone: str, num_classes: int) -> AttentionNet:
    """The arm's network with the pretrained trunk (its tail still untrained)."""
    placement = arm.placement if arm.has_attention else "last"
    net = AttentionNet(backbone, num_classes, attention=arm.attention, placement=placement,
                       pretrained=True)  # fmt: skip
    if arm.has_attention:
        gate = attention_module(net).spatial_gate
        if gate is not None:
            with torch.no_grad():
                gate.bn.weight.fill_(float(arm.gamma))
    return net


def attention_module(net: AttentionNet) -> nn.Module:
    """The single attention module of a ``placement=last`` / ``after:`` network."""
    if len(net.attention_names) != 1:
        raise ValueError(f"expected one attention module, found {net.attention_names}")
    return net.get_submodule(net.attention_names[0])


def cache_site(arm: Arm, net: AttentionNet) -> str:
    """The layer whose output the tail starts from: the attention's input (or the CAM layer)."""
    if arm.has_attention and arm.placement.startswith(AFTER):
        return f"features.{arm.placement[len(AFTER) :]}"
    return net.cam_layer


def _flat_features(seq: nn.Module, prefix: str, site: str) -> list[tuple[str, nn.Module]]:
    """Children of ``seq`` in forward order, expanding the Sequential that contains ``site``."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in seq.named_children():
        full = f"{prefix}.{name}"
        if isinstance(child, nn.Sequential) and site.startswith(full + "."):
            out.extend(_flat_features(child, full, site))
        else:
            out.append((full, child))
    return out


class Tail(nn.Module):
    """The part of ``net`` after ``site``: features from there on, then the head."""

    def __init__(self, net: AttentionNet, site: str) -> None:
        super().__init__()
        flat = _flat_features(net.features, "features", site)
        names = [n for n, _ in flat]
        if site not in names:
            raise ValueError(f"{site!r} is not a layer on the features path: {names}")
        self.names = names[names.index(site) + 1 :]
        self.layers = nn.ModuleList([m for n, m in flat if n in self.names])
        self.head = net.head

    def forward(self, feats: Tensor) -> Tensor:
        for layer in self.layers:
            feats = layer(feats)
        return self.head(feats)


def _param_groups(tail: Tail, arm: Arm, lr: float, wd: float) -> list[dict[str, Any]]:
    attn, other = [], []
    for name, layer in zip(tail.names, tail.layers, strict=True):
        is_attn = "attention" in name.rsplit(".", 1)[-1]
        for pname, p in layer.named_parameters():
            if arm.freeze_spatial and is_attn and pname.startswith("spatial_gate."):
                p.requires_grad_(False)
                continue
            (attn if is_attn else other).append(p)
    other += list(tail.head.parameters())
    groups = [{"params": other, "lr": lr, "weight_decay": wd}]
    if attn:
        groups.append({"params": attn, "lr": lr * arm.attention_lr_mult,
                       "weight_decay": wd if arm.attention_weight_decay else 0.0})  # fmt: skip
    return groups


def _train_mode(tail: Tail, arm: Arm) -> None:
    tail.train()
    if arm.freeze_spatial:
        for _name, layer in zip(tail.names, tail.layers, strict=True):
            gate = getattr(layer, "spatial_gate", None)
            if gate is not None:
                gate.eval()  # its BN statistics stay at their initial values too


def train_tail(
    tail: Tail, arm: Arm, feats: Tensor, labels: Tensor, t: DictConfig, seed: int
) -> dict[str, Any]:
    """AdamW with a cosine schedule on cached features; returns the final training loss."""
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    if arm.shuffle_labels:
        labels = labels[torch.randperm(labels.numel(), generator=gen)]
    opt = torch.optim.AdamW(_param_groups(tail, arm, float(t.lr), float(t.weight_decay)))
    n, bs, epochs = feats.shape[0], int(t.batch_size), int(t.epochs)
    steps = epochs * max(1, n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, pct_start=0.1
    )
    loss_fn, losses = nn.CrossEntropyLoss(), []
    _train_mode(tail, arm)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for k in range(max(1, n // bs)):
            idx = order[k * bs : (k + 1) * bs]
            loss = loss_fn(tail(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    tail.eval()
    return {"final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "steps": steps}


@torch.no_grad()
def accuracy(tail: Tail, feats: Tensor, labels: Tensor, batch: int = 256) -> float:
    """Top-1 accuracy (%) of the tail on cached features."""
    with eval_mode(tail):
        pred = torch.cat(
            [tail(feats[s : s + batch]).argmax(1) for s in range(0, len(feats), batch)]
        )
    return float((pred == labels).float().mean()) * 100.0


def fit_arm(
    arm: Arm,
    seed: int,
    g: DictConfig,
    feats: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    num_classes: int,
    path: Path,
) -> tuple[AttentionNet, dict[str, Any]]:
    """Train (or load from ``path``) the arm's tail for ``seed``; returns the net and its record."""
    torch.manual_seed(int(seed))
    net = build_net(arm, str(g.backbone), num_classes)
    site = cache_site(arm, net)
    tail = Tail(net, site)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        return net.eval(), saved["record"]
    start = time.perf_counter()
    fit = train_tail(tail, arm, feats["train"][site], labels["train"], g.train, seed)
    record = {
        "arm": arm.name, "seed": int(seed), "site": site, **fit,
        "train_accuracy": accuracy(tail, feats["train"][site], labels["train"]),
        "val_accuracy": accuracy(tail, feats["val"][site], labels["val"]),
        "test_accuracy": accuracy(tail, feats["test"][site], labels["test"]),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    atomic_torch_save({"state_dict": net.state_dict(), "record": record}, path)
    log.info("arm %s seed %d: test %.1f%% (%.0f s)", arm.name, seed, record["test_accuracy"],
             record["seconds"])  # fmt: skip
    return net.eval(), record


__all__ = ["ARM_DEFAULTS", "Arm", "Tail", "accuracy", "attention_module", "build_net",
           "cache_site", "fit_arm", "train_tail"]  # fmt: skip
