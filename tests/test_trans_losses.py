"""SeMani-Trans losses against hand computations; the straight-through CLIP semantic loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semani.modules.clip import TINY_CLIP_NAME, ClipModel
from semani.modules.trans_losses import (
    TEXT_LOSSES,
    SemaniTransLoss,
    autoregressive_loss,
    clip_semantic_loss,
    gray_loss,
    image_loss,
    straight_through_onehot,
    text_loss,
    text_loss_all_positions,
    text_pad_targets,
)


def _nll(logits: torch.Tensor, target: int) -> float:
    """-log softmax(logits)[target], by hand."""
    m = max(logits.tolist())
    log_z = m + math.log(sum(math.exp(v - m) for v in logits.tolist()))
    return log_z - logits[target].item()


def test_text_loss_ignores_padding() -> None:
    torch.manual_seed(0)
    B, L, V = 3, 6, 11
    logits, text = torch.randn(B, L, V), torch.randint(0, V, (B, L))
    pad = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    terms = [_nll(logits[b, i], text[b, i]) for b in range(B) for i in range(L) if not pad[b, i]]
    assert text_loss(logits, text, pad).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # padding positions do not matter at all
    logits2 = torch.where(pad[..., None], torch.randn(B, L, V) * 10, logits)
    assert text_loss(logits2, text, pad).item() == pytest.approx(
        text_loss(logits, text, pad).item()
    )


def test_authors_text_loss_predicts_a_pad_class_per_position() -> None:
    """The authors' (DALL-E) text loss: CE at every position, pad position i targets V + i."""
    torch.manual_seed(8)
    B, L, V = 3, 6, 11
    logits = torch.randn(B, L, V + L)  # a text head with L pad classes
    text = torch.randint(0, V, (B, L))
    pad = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    targets = text_pad_targets(text, pad, V)
    assert targets[0].tolist() == text[0, :3].tolist() + [V + 3, V + 4, V + 5]
    assert torch.equal(targets[1], text[1])
    terms = [
        _nll(logits[b, i], V + i if pad[b, i] else int(text[b, i]))
        for b in range(B)
        for i in range(L)
    ]
    want = sum(terms) / (B * L)  # every position counts, pads included
    assert text_loss_all_positions(logits, text, pad).item() == pytest.approx(want, rel=1e-5)
    assert text_loss_all_positions(logits, text, pad, V).item() == pytest.approx(want, rel=1e-5)
    crit = SemaniTransLoss(text_loss="all_positions")
    image_logits, image = torch.randn(B, 4, 5), torch.randint(0, 5, (B, 4))
    out = crit(logits, image_logits, None, text, image, pad)
    assert out["loss_txt"].item() == pytest.approx(want, rel=1e-5)

    # with padding it differs from ours (which skips the pads and only sees the V real classes
    # of the same logits' softmax over V + L)
    ours = text_loss(logits, text, pad).item()
    assert abs(ours - want) > 1e-3
    # without padding both are the mean CE over every position: equal
    no_pad = torch.zeros(B, L, dtype=torch.bool)
    assert text_loss_all_positions(logits, text, no_pad).item() == pytest.approx(
        text_loss(logits, text, no_pad).item(), rel=1e-6
    )


def test_text_loss_modes_and_errors() -> None:
    assert TEXT_LOSSES == ("non_padding", "all_positions")
    with pytest.raises(ValueError, match="non_padding.*all_positions"):
        SemaniTransLoss(text_loss="padding")
    torch.manual_seed(9)
    B, L, V, EOT = 2, 6, 11, 10  # EOT is the last vocabulary id, as CLIP's 49407
    text = torch.tensor([[9, 3, EOT, 0, 0, 0], [9, 4, 5, 6, 7, EOT]])
    pad = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).bool()
    image_logits, image = torch.randn(B, 4, 5), torch.randint(0, 5, (B, 4))
    authors = SemaniTransLoss(text_loss="all_positions")
    # a GPT without the pad classes (text head of V outputs) is a clear error ...
    with pytest.raises(ValueError, match="text_pad_targets"):
        authors(torch.randn(B, L, V), image_logits, None, text, image, pad)
    # ... also when the vocabulary size is given (checked from the shape alone)
    sized = SemaniTransLoss(text_loss="all_positions", text_vocab_size=V)
    with pytest.raises(ValueError, match="text_pad_targets"):
        sized(torch.randn(B, L, V), image_logits, None, text, image, pad)
    logits = torch.randn(B, L, V + L)
    got = sized(logits, image_logits, None, text, image, pad)["loss_txt"]
    assert got.item() == pytest.approx(text_loss_all_positions(logits, text, pad).item())
    # ours works with either head (pad classes are never targets)
    ours = SemaniTransLoss(text_loss="non_padding")
    for lg in (torch.randn(B, L, V), logits):
        got = ours(lg, image_logits, None, text, image, pad)["loss_txt"]
        assert got.item() == pytest.approx(text_loss(lg, text, pad).item())


def test_image_loss_is_the_mean_token_nll() -> None:
    torch.manual_seed(1)
    B, L, V = 2, 5, 7
    logits, image = torch.randn(B, L, V), torch.randint(0, V, (B, L))
    terms = [_nll(logits[b, i], image[b, i]) for b in range(B) for i in range(L)]
    assert image_loss(logits, image).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_gray_loss_counts_only_gray_samples() -> None:
    torch.manual_seed(2)
    B, L, V = 4, 5, 7
    logits, gray = torch.randn(B, L, V), torch.randint(0, V, (B, L))
    use = torch.tensor([True, False, True, False])
    terms = [_nll(logits[b, i], gray[b, i]) for b in (0, 2) for i in range(L)]
    assert gray_loss(logits, gray, use).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # the other samples' logits do not matter
    logits2 = logits.clone()
    logits2[~use] = torch.randn(2, L, V) * 10
    assert gray_loss(logits2, gray, use).item() == pytest.approx(
        gray_loss(logits, gray, use).item()
    )
    # no gray sample -> exactly 0, and no gray tokens at all -> 0
    assert gray_loss(logits, gray, torch.zeros(B, dtype=torch.bool)).item() == 0.0
    assert gray_loss(None, None, None).item() == 0.0
    # use_gray None = every sample
    assert gray_loss(logits, gray, None).item() == pytest.approx(image_loss(logits, gray).item())


def test_autoregressive_loss_formula() -> None:
    l_txt, l_img, l_vg = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert autoregressive_loss(l_txt, l_img, l_vg).item() == pytest.approx((2 + 5 + 7 * 3) / 9)
    got = autoregressive_loss(l_txt, l_img, l_vg, lambda_txt=2, lambda_img=1, lambda_vg=0)
    assert got.item() == pytest.approx((2 * 2 + 3) / 3)
    # no gray samples: L_vg = 0 but the denominator keeps lambda_vg (authors' normalisation)
    no_vg = autoregressive_loss(l_txt, l_img, torch.tensor(0.0))
    assert no_vg.item() == pytest.approx((2 + 7 * 3) / 9)
    with pytest.raises(ValueError, match="positive sum"):
        autoregressive_loss(l_txt, l_img, l_vg, 0, 0, 0)


@pytest.mark.parametrize("noise", [False, True])
def test_straight_through_is_one_hot_forward_softmax_backward(noise: bool) -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 6, 10, requires_grad=True)
    coef = torch.randn(4, 6, 10)
    tau = 0.7
    torch.manual_seed(7)
    hard = straight_through_onehot(logits, tau=tau, noise=noise)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.detach().sum(-1), torch.ones(4, 6))
    if not noise:
        torch.testing.assert_close(hard.detach().argmax(-1), logits.detach().argmax(-1))
    (g_hard,) = torch.autograd.grad((hard * coef).sum(), logits)
    # the gradient is the (Gumbel-perturbed, same seed) softmax's
    torch.manual_seed(7)
    soft = F.gumbel_softmax(logits, tau=tau, hard=False) if noise else F.softmax(logits / tau, -1)
    (g_soft,) = torch.autograd.grad((soft * coef).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)
    assert g_hard.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        straight_through_onehot(logits, tau=0.0)


class TinyDecoder(nn.Module):
    """A frozen stand-in VQGAN: codebook (K, C) and a conv decoder, 4x4 tokens -> 32 px."""

    def __init__(self, n_embed: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(n_embed, dim))
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=8), nn.Conv2d(dim, 3, 3, padding=1), nn.Tanh()
        )

    def embed_onehot(self, onehot: torch.Tensor) -> torch.Tensor:
        return (onehot @ self.codebook).permute(0, 3, 1, 2)  # (B, C, h, w)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)


@pytest.fixture(scope="module")
def frozen() -> tuple[TinyDecoder, ClipModel]:
    torch.manual_seed(0)
    return TinyDecoder().requires_grad_(False), ClipModel(TINY_CLIP_NAME)


def test_semantic_loss_value_and_gradients(frozen: tuple[TinyDecoder, ClipModel]) -> None:
    vq, clip = frozen
    torch.manual_seed(4)
    head = nn.Linear(12, 16)  # stands in for the transformer's image head
    feats = torch.randn(2, 16, 12)
    captions = ["a red square", "a blue circle"]
    logits = head(feats)  # (B, Li=4*4, K=16)

    loss, images = clip_semantic_loss(logits, captions, vq, clip, (4, 4), tau=1.0, noise=False)
    # by hand: decode the argmax tokens, 1 - cos with the caption embeddings
    onehot = F.one_hot(logits.argmax(-1), 16).float().view(2, 4, 4, 16)
    ref_images = vq.decode(vq.embed_onehot(onehot))
    torch.testing.assert_close(images, ref_images)
    cos = F.cosine_similarity(clip.encode_image(ref_images), clip.encode_text(captions), dim=-1)
    assert loss.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)

    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(vq.parameters()) + list(clip.parameters()))


def test_semantic_loss_with_gumbel_noise_trains(frozen: tuple[TinyDecoder, ClipModel]) -> None:
    """A few steps on the semantic loss alone raise the CLIP similarity of the decoded image."""
    vq, clip = frozen
    torch.manual_seed(5)
    logits = torch.zeros(1, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)

    def greedy_loss() -> float:
        with torch.no_grad():
            return clip_semantic_loss(logits, ["a red square"], vq, clip, (4, 4), noise=False)[
                0
            ].item()

    start = greedy_loss()
    for _ in range(15):
        loss, _ = clip_semantic_loss(logits, ["a red square"], vq, clip, (4, 4), tau=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert greedy_loss() < start - 0.05


def test_semani_trans_loss_combines_the_terms(frozen: tuple[TinyDecoder, ClipModel]) -> None:
    vq, clip = frozen
    torch.manual_seed(6)
    B, Lt, Li, Vt, Vi = 2, 5, 16, 20, 16
    text_logits, image_logits = torch.randn(B, Lt, Vt), torch.randn(B, Li, Vi)
    gray_logits = torch.randn(B, Li, Vi)
    text, image, gray = (
        torch.randint(0, Vt, (B, Lt)), torch.randint(0, Vi, (B, Li)), torch.randint(0, Vi, (B, Li))
    )  # fmt: skip
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]).bool()
    use = torch.tensor([False, True])
    crit = SemaniTransLoss(lambda_txt=1, lambda_img=7, lambda_vg=1, lambda_sem=5, gumbel_tau=1.0)
    out = crit(
        text_logits, image_logits, gray_logits, text, image, pad, gray, use,
        sem_text=["a", "b"], vqgan=vq, clip=clip, grid=(4, 4), sem_noise=False,
    )  # fmt: skip
    l_txt, l_img = text_loss(text_logits, text, pad), image_loss(image_logits, image)
    l_vg = gray_loss(gray_logits, gray, use)
    l_sem, _ = clip_semantic_loss(image_logits, ["a", "b"], vq, clip, (4, 4), noise=False)
    for key, ref in [("loss_txt", l_txt), ("loss_img", l_img), ("loss_vg", l_vg)]:
        assert out[key].item() == pytest.approx(ref.item(), rel=1e-6), key
    l_ar = (l_txt + l_vg + 7 * l_img) / 9
    assert out["loss_ar"].item() == pytest.approx(l_ar.item(), rel=1e-6)
    assert out["loss_sem"].item() == pytest.approx(l_sem.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((l_ar + 5 * l_sem).item(), rel=1e-5)

    # without the frozen models (or lambda_sem = 0) there is no semantic term
    plain = crit(text_logits, image_logits, None, text, image, pad)
    assert "loss_sem" not in plain and plain["loss_vg"].item() == 0.0
    assert plain["loss"].item() == pytest.approx(((l_txt + 7 * l_img) / 9).item(), rel=1e-6)
    with pytest.raises(ValueError, match="sem_text"):
        crit(text_logits, image_logits, None, text, image, pad, vqgan=vq, clip=clip)
