"""Under DDP (2 CPU processes, gloo) the synced metrics equal the single-process result."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attncam.metrics import (
    AverageDrop,
    Curves,
    DeletionInsertion,
    PercentageIn,
    PointingGame,
    SanityCheck,
)

N_IMAGES = 7  # odd: the two ranks hold 4 and 3 images (uneven gather)


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    y = torch.rand(N_IMAGES, generator=g) * 0.9 + 0.1
    o = torch.rand(N_IMAGES, generator=g)
    o[2] = float("nan")  # one skipped image, counted on whichever rank holds it
    maps = torch.rand(N_IMAGES, 12, 12, generator=g)
    masks = torch.rand(N_IMAGES, 12, 12, generator=g) > 0.7
    masks[5] = False  # no annotation
    return {
        "y": y,
        "o": o,
        "pin": torch.rand(N_IMAGES, 3, generator=g),
        "del": torch.rand(N_IMAGES, 5, generator=g),
        "ins": torch.rand(N_IMAGES, 5, generator=g),
        "maps": maps,
        "masks": masks,
        "rand_maps": torch.rand(N_IMAGES, 12, 12, generator=g),
    }


def _results(idx: torch.Tensor) -> dict[str, Any]:
    d = {k: v[idx] for k, v in _data().items()}
    kw = {"num_resamples": 300}
    ad, pin, di = AverageDrop(**kw), PercentageIn((5, 10, 50), **kw), DeletionInsertion(**kw)
    pg, sc = PointingGame(tolerance=2, **kw), SanityCheck(["top"], **kw)
    ad.update(d["y"], d["o"])
    pin.update(d["y"], d["pin"])
    di.update(Curves(torch.linspace(0, 1, 5), d["del"], d["ins"]))
    pg.update(d["maps"], d["masks"])
    sc.update(d["maps"], {"top": d["rand_maps"]})
    out: dict[str, Any] = {"average_drop": ad.compute().to_dict()}
    out |= {k: v.to_dict() for k, v in pin.compute().items()}
    out |= {k: v.to_dict() for k, v in di.compute().items()}
    out["mean_deletion_curve"] = di.mean_curves()["deletion"].tolist()
    out["pointing_game"] = pg.compute().to_dict()
    out |= {k: v.to_dict() for k, v in sc.compute().items()}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = _results(torch.arange(rank, N_IMAGES, 2))  # DistributedSampler-style interleave
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_close(a: Any, b: Any, key: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _assert_close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), key
        for x, y in zip(a, b, strict=True):
            _assert_close(x, y, key)
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (key, a, b)
    else:
        assert a == b, (key, a, b)


def test_ddp_synced_metrics_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _results(torch.arange(N_IMAGES))
    assert single["average_drop"]["n"] == N_IMAGES - 1
    assert single["average_drop"]["skipped"] == {"non_finite": 1}
    assert single["pointing_game"]["skipped"] == {"empty_mask": 1}
    for rank in range(2):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_close(synced, single)
