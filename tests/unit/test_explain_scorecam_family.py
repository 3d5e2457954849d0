"""SS-CAM and IS-CAM: golden values on a hand-built probe, identities with Score-CAM, torchcam.

The probe's CAM layer is the image itself (three channels, no upsampling) and its logits are a
fixed linear function of the channel means, so every masked image's class probability is a
number that can be written down by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attncam.explain import Explainer
from attncam.explain.methods.perturbation import ISCAM
from attncam.models import AttentionNet

W = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -1.0]])
# Channel 0 spans [0, 1] (its mask is itself), channel 1 spans [0.2, 1], channel 2 is constant.
X = torch.tensor([[[0.0, 1.0], [0.5, 0.25]], [[0.2, 0.4], [0.6, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])[
    None
]
H = torch.stack([X[0, 0], (X[0, 1] - 0.2) / 0.8])  # s(A^k) of the two non-constant channels


class Probe(nn.Module):
    """``logits = W @ mean_pixels(x)``; layer ``feat`` is the image."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(W)
        self.inputs: list[torch.Tensor] = []
        self.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).mean((2, 3)))


def _p_class0(masked: torch.Tensor) -> torch.Tensor:
    """Softmax probability of class 0 (the clean image's class) for images ``(m, 3, 2, 2)``."""
    logits = masked.mean((2, 3)) @ W.T
    return torch.softmax(logits, 1)[:, 0]


def _expected_map(w: torch.Tensor) -> torch.Tensor:
    """``normalize(ReLU(sum_k w_k A^k))`` with ``A = X`` (the probe's layer)."""
    m = torch.relu(torch.einsum("k,khw->hw", w, X[0]))
    return (m - m.min()) / (m.max() - m.min())


def _run(method: tuple[str, dict]) -> tuple[torch.Tensor, dict, Probe]:
    probe = Probe()
    res = Explainer(probe, [method], layer="feat").explain(X)
    assert int(res.targets[0]) == 0  # clean means (0.4375, 0.55, 0.5): logits (0.575, 0.05)
    return res.maps[next(iter(res.maps))][0], res.extras, probe


def test_iscam_golden_values_and_mask_schedule() -> None:
    n = 3
    got, extras, probe = _run(("iscam", {"n": n}))
    # Cumulative masks M_i = M_(i-1) + (i/n) h: scales 1/3, 1, 2 (1/3, 1/3 + 2/3, 1 + 3/3).
    scales = [1 / 3, 1.0, 2.0]
    assert [ISCAM.coefficient(i, n) for i in range(n)] == pytest.approx(scales)
    masked = probe.inputs[1:]  # the first forward is the clean image
    assert len(masked) == n
    for c, batch in zip(scales, masked, strict=True):
        assert torch.allclose(batch, c * X * H[:, None], atol=1e-6)
    w = torch.stack([_p_class0(c * X * H[:, None]) for c in scales]).mean(0)  # (2,)
    w = torch.cat([w, torch.zeros(1)])  # the constant channel is skipped: weight 0
    assert torch.allclose(extras["iscam[n=3].weights"][0], w, atol=1e-6)
    assert extras["iscam[n=3].skipped"].tolist() == [1]
    assert torch.allclose(got, _expected_map(w), atol=1e-5)


def test_sscam_golden_values_with_seeded_noise() -> None:
    n, sigma, seed = 4, 0.5, 3
    got, extras, _ = _run(("sscam", {"n": n, "sigma": sigma, "seed": seed}))
    gen = torch.Generator().manual_seed(seed)
    probs = []
    for _ in range(n):  # both kept channels are one batch: one (2, 2, 2) draw per sample
        mask = H + torch.normal(0.0, sigma, size=(2, 2, 2), generator=gen)
        probs.append(_p_class0(X * mask[:, None]))
    w = torch.cat([torch.stack(probs).mean(0), torch.zeros(1)])
    name = f"sscam[n={n},seed={seed},sigma={sigma}]"
    assert torch.allclose(extras[f"{name}.weights"][0], w, atol=1e-6)
    assert torch.allclose(got, _expected_map(w), atol=1e-5)


def test_torchcam_scoring_differs_from_score_cam() -> None:
    """torchcam 0.5 scores a mask by the target *logit* minus the clean image's and takes a
    softmax over *channels* (so its weights sum to 1 over k); Score-CAM (Wang et al. 2020,
    eq. 5-8) and the default variant use the class *probability* of the masked image."""
    n = 2
    _, extras, _ = _run(("iscam", {"n": n, "variant": "torchcam"}))
    w_tc = extras["iscam[n=2,torchcam].weights"][0]
    assert float(w_tc.sum()) == pytest.approx(1.0)
    # By hand: masks (A - min) / (max - min + 1e-8) (constant channel -> all-zero mask), the
    # masked image scaled by c_i (1/2, 3/2), score = logit_0(masked) - logit_0(x).
    h = torch.stack([H[0], H[1], torch.zeros(2, 2)]) * (1 / (1 + 1e-8))
    base = (X.mean((2, 3)) @ W.T)[0, 0]
    scores = torch.stack([(c * X * h[:, None]).mean((2, 3)) @ W.T for c in (0.5, 1.5)])[
        ..., 0
    ]  # (n, 3)
    assert torch.allclose(w_tc, torch.softmax((scores - base).mean(0), 0), atol=1e-5)
    _, extras, _ = _run(("iscam", {"n": n}))
    w_paper = extras["iscam[n=2].weights"][0]
    assert float(w_paper.sum()) != pytest.approx(1.0)
    assert ((w_paper[:2] > 0) & (w_paper[:2] < 1)).all()


def test_iscam_torchcam_schedule_is_its_code_not_its_docstring() -> None:
    """torchcam's code scales the i-th masked image by sum_(j=1..i) j/n (first 1/n); its
    docstring writes sum_(j=0..i-1) j/n, which would start at 0 (a black image)."""
    _, _, probe = _run(("iscam", {"n": 4, "variant": "torchcam"}))
    masked = torch.cat(probe.inputs[1:])  # (4 samples * 3 channels, 3, 2, 2), channel 0 first
    scale = masked[::3].flatten(1).amax(1) / (X * H[0]).max()
    assert scale.tolist() == pytest.approx([0.25, 0.75, 1.5, 2.5], abs=1e-6)


@pytest.fixture(scope="module")
def tiny() -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet("tiny", 5, "cbam").eval()


def test_zero_noise_and_one_step_are_score_cam(tiny: AttentionNet) -> None:
    x = torch.rand(2, 3, 48, 48)
    methods = ["scorecam", ("sscam", {"n": 2, "sigma": 0.0}), ("iscam", {"n": 1})]
    maps = Explainer(tiny, methods)(x)
    ref = maps.pop("scorecam")
    assert ref.amax() == 1
    for name, m in maps.items():
        assert torch.allclose(m, ref, atol=1e-6), name


def test_sscam_seed_reproduces_and_noise_changes_the_map(tiny: AttentionNet) -> None:
    x = torch.rand(1, 3, 48, 48)

    def run(seed: int) -> torch.Tensor:
        return Explainer(tiny, [("sscam", {"n": 2, "sigma": 0.5, "seed": seed})])(x)[
            f"sscam[n=2,seed={seed},sigma=0.5]"
        ]

    state = torch.get_rng_state()
    a, b = run(1), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # a private generator
    assert torch.equal(a, b) and not torch.allclose(a, run(2))


@pytest.mark.parametrize(
    ("key", "cls_name", "kwargs"),
    [("sscam", "SSCAM", {"num_samples": 2, "std": 2.0}), ("iscam", "ISCAM", {"num_samples": 2})],
)
def test_torchcam_variant_agrees_with_torchcam(key: str, cls_name: str, kwargs: dict) -> None:
    torchcam = pytest.importorskip("torchcam.methods")
    torch.manual_seed(0)
    net = AttentionNet("resnet18", 10, "none").eval()
    x = torch.rand(1, 3, 32, 32)
    layer = "features.layer2"  # 128 channels, 4 x 4 at 32 px
    torch.manual_seed(5)
    options = {"variant": "torchcam", "n": kwargs["num_samples"], "batch_size": 64}
    if key == "sscam":
        options["sigma"] = kwargs["std"]
    ex = Explainer(net, [(key, options)], layer=layer, upsample=False)
    ours = ex(x)[ex.names[0]]
    torch.manual_seed(5)  # the same noise draws, in the same order
    cls = getattr(torchcam, cls_name)
    with cls(net, layer, batch_size=64, input_shape=(3, 32, 32), **kwargs) as extractor:
        with torch.no_grad():
            out = net(x)
        theirs = extractor(class_idx=out.argmax(1).tolist(), scores=out)[0]
    assert ours.shape == theirs.shape == (1, 4, 4)
    assert torch.allclose(ours, theirs, atol=1e-5)
