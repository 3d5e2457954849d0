"""Which images an evaluation explains: a seeded, class-stratified subset for ``limit=N``.

Taking the first N samples of a folder sorted by path explains only the first classes of an
ImageNet-style ``val/<wnid>/`` tree. Here every class gets its share of N (largest remainders
break ties, so all classes appear when N >= the number of classes) and the members of a class
are drawn in a seeded random order; the result is sorted, so batches follow the dataset order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stratified_subset(labels: Sequence[int] | torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """Indices of a class-stratified random subset of size ``min(n, len(labels))``.

    Args:
        labels: One class id per sample (any integers; one value means no stratification).
        n: Subset size, >= 1.
        seed: Seed of the draw (the same seed and labels give the same subset).

    Returns:
        Sorted indices into ``labels``.

    Raises:
        ValueError: If ``n < 1``.
    """
    if int(n) < 1:
        raise ValueError(f"limit must be a positive number of images; got {n}")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    total = labels.numel()
    if n >= total:
        return list(range(total))
    gen = torch.Generator().manual_seed(int(seed))
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    order = torch.argsort(quota - take.double(), descending=True, stable=True)
    take[order[: n - int(take.sum())]] += 1
    picked: list[int] = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        perm = members[torch.randperm(members.numel(), generator=gen)]
        picked += perm[:k].tolist()
    return sorted(picked)


def dataset_labels(dataset: object) -> torch.Tensor | None:
    """The ``labels`` a dataset exposes (a tensor or sequence), or None when it has none."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    return torch.as_tensor(labels, dtype=torch.long)
