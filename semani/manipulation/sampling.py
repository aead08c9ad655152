"""Autoregressive image-token sampling for SeMani-Trans with a static KV cache and forced tokens.

Inference only. The prefix (`[BOV] gray [BOT] text`, or `[BOT] text`) and every image token
before the first re-sampled position go through the transformer in one pass (`prefill`); then
each re-sampled position costs one step that feeds the token just chosen plus the run of forced
tokens after it (`step`). Forced tokens are written into the cache like sampled ones.
With `use_cache=False` the full forward is recomputed for every sampled position (same tokens,
for tests and benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semani.modules.gpt import SemaniGPT


def top_k_k(num_logits: int, filter_thres: float) -> int:
    """The authors' k: `max(int((1 - filter_thres) * V), 1)` (0.99 keeps the top 1%)."""
    if not 0.0 <= filter_thres <= 1.0:
        raise ValueError(f"filter_thres must be in [0, 1], got {filter_thres}")
    return max(int((1 - filter_thres) * num_logits), 1)


def top_k_filter(logits: Tensor, filter_thres: float = 0.99) -> Tensor:
    """Keep exactly the k largest logits (B, V) and set the others to -inf."""
    k = top_k_k(logits.shape[-1], filter_thres)
    val, ind = torch.topk(logits, k, dim=-1)  # (B, k)
    out = torch.full_like(logits, float("-inf"))  # (B, V)
    return out.scatter_(-1, ind, val)


def sample_logits(
    logits: Tensor,
    filter_thres: float = 0.99,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of `logits` (B, V): argmax if greedy (or temperature 0), else a draw
    from softmax(top_k(logits) / temperature). Returns (B,) long."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    probs = F.softmax(top_k_filter(logits, filter_thres).float() / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


def _validate(
    gpt: SemaniGPT, text: Tensor, image: Tensor | None, token_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    B, Li = text.shape[0], gpt.config.image_len
    if image is None:
        if token_mask is not None and not bool(token_mask.all()):
            raise ValueError("token_mask forces tokens but no image was given: pass image")
        image = torch.zeros(B, Li, dtype=torch.long, device=text.device)
    if image.shape != (B, Li) or image.dtype != torch.long:
        raise ValueError(f"image must be a ({B}, {Li}) LongTensor, got {tuple(image.shape)}")
    if token_mask is None:
        token_mask = torch.ones(B, Li, dtype=torch.bool, device=text.device)
    if token_mask.shape != (B, Li) or token_mask.dtype != torch.bool:
        raise ValueError(
            f"token_mask must be a ({B}, {Li}) bool tensor (True = re-sample), "
            f"got {tuple(token_mask.shape)} {token_mask.dtype}"
        )
    return image.to(text.device), token_mask.to(text.device)


@torch.inference_mode()
def sample_image_tokens(
    gpt: SemaniGPT,
    text: Tensor,
    image: Tensor | None = None,
    token_mask: Tensor | None = None,
    gray: Tensor | None = None,
    use_gray: Tensor | None = None,
    filter_thres: float = 0.99,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sample image tokens (B, Li) given text (B, Lt), re-sampling only where `token_mask`.

    Args:
        gpt: the transformer (put in eval mode for the call).
        text: (B, Lt) CLIP BPE tokens.
        image: (B, Li) original image tokens; positions where `token_mask` is False are forced
            to them. None: sample every position.
        token_mask: (B, Li) bool, True = re-sample. None: all True.
        gray: (B, Li) grayscale tokens for vision guidance; `use_gray` (B,) bool selects the
            samples that use them (default all). Without `gray` the gray segment is skipped.
        filter_thres, temperature, greedy: top-k (authors' `filter_thres`) and temperature;
            greedy (or temperature 0) takes the argmax.
        generator: a `torch.Generator` on the model's device, for reproducible draws.
        use_cache: False recomputes the full forward for every sampled position.
    """
    image, token_mask = _validate(gpt, text, image, token_mask)
    out = image.clone()  # (B, Li)
    sampled = token_mask.any(0).nonzero().flatten().tolist()  # positions re-sampled in any row
    if not sampled:
        return out
    kw = dict(
        filter_thres=filter_thres, temperature=temperature, greedy=greedy, generator=generator
    )
    was_training = gpt.training
    gpt.eval()
    try:
        if use_cache:
            cache = gpt.new_kv_cache(text.shape[0], with_gray=gray is not None)
            # everything before the first sampled position is known: one pass
            logits = gpt.prefill(text, cache, gray, use_gray, image=out[:, : sampled[0]])
            for n, i in enumerate(sampled):
                tok = sample_logits(logits, **kw)  # (B,)
                out[:, i] = torch.where(token_mask[:, i], tok, out[:, i])
                if n + 1 < len(sampled):  # feed token i and the forced run up to the next one
                    logits = gpt.step(out[:, i : sampled[n + 1]], cache)  # (B, Vi)
        else:
            for i in sampled:
                logits = gpt(text, out[:, : i + 1], gray, use_gray).image_logits[:, i]  # (B, Vi)
                tok = sample_logits(logits, **kw)  # (B,)
                out[:, i] = torch.where(token_mask[:, i], tok, out[:, i])
    finally:
        gpt.train(was_training)
    return out
