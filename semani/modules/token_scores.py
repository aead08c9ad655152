"""Token-wise (FILIP-style) entity-word scores from CLIP patch and word-token features.

What SeMani-Trans's token-wise entity scorer (the alignment's `TokenWiseScorer`) computes, and
the CLIP training's region-word loss with it:

- `word_token_positions`: the prompt `template.format(word=word)` as BPE ids and the positions of
  the word's own tokens (after "<sot>" and the template's prefix, before its suffix and EOT);
- `word_token_features`: the L2-normalised text features of those tokens, several words at once;
- `entity_token_scores`: per entity, the mean over its patch-grid cells of the max over the word
  tokens of the cosine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from semani.modules.clip_tokens import token_features

__all__ = [
    "DEFAULT_TEMPLATE",
    "entity_token_scores",
    "word_token_features",
    "word_token_positions",
]

DEFAULT_TEMPLATE = "a photo of a {word}."  # the scorers' prompt; the word goes in {word}


def entity_token_scores(
    patches: Tensor,
    words: Tensor,
    token_masks: Tensor,
    min_cells: int = 4,
    word_mask: Tensor | None = None,
) -> Tensor:
    """FILIP-style entity similarity from normalised features.

    Args:
        patches: (N, D) L2-normalised image-token embeddings.
        words: (T, D) L2-normalised embeddings of the word's own tokens, or (V, T, D) for V
            words at once (padded; `word_mask` (V, T) marks the real tokens).
        token_masks: (K, N) bool, each entity's cells on the patch grid.
        min_cells: entities with fewer cells get NaN.

    Returns:
        (K,) (or (K, V)) mean over each entity's cells of the max over the word tokens of the
        cosine.
    """
    single = words.dim() == 2
    sim = torch.einsum("nd,vtd->nvt", patches, words[None] if single else words)  # (N, V, T)
    if word_mask is not None:
        sim = sim.masked_fill(~word_mask, float("-inf"))
    per_patch = sim.amax(dim=-1)  # (N, V)
    m = token_masks.to(per_patch.dtype)  # (K, N)
    counts = m.sum(dim=1, keepdim=True)  # (K, 1)
    scores = (m @ per_patch) / counts.clamp(min=1)  # (K, V)
    scores = scores.masked_fill(counts < max(min_cells, 1), float("nan"))
    return scores[:, 0] if single else scores


@functools.lru_cache(maxsize=4096)
def word_token_positions(tokenizer, template: str, word: str) -> tuple[Tensor, list[int]]:
    """The prompt `template.format(word=word)` as (1, context) token ids of open_clip's BPE
    `tokenizer`, and the positions of the word's own tokens: after "<sot>" and the template's
    prefix, before its suffix and EOT (5 .. EOT-2 for "a photo of a {word}."). Remembered per
    (tokenizer, template, word): do not modify the returned tensor."""
    prefix, suffix = template.split("{word}", 1)
    tokens = tokenizer([template.format(word=word)])  # (1, ctx)
    ids = tokens[0].tolist()
    if tokenizer.eot_token_id not in ids:
        raise ValueError(f"the prompt for {word!r} does not fit the CLIP context")
    eot = ids.index(tokenizer.eot_token_id)
    pre, suf = tokenizer.encode(prefix), tokenizer.encode(suffix)
    start, stop = 1 + len(pre), eot - len(suf)  # after <sot> + prefix, before the suffix
    if stop <= start or ids[1:start] != pre or ids[stop:eot] != suf:
        raise ValueError(
            f"cannot locate the tokens of {word!r} in {template!r}: the prompt's BPE "
            "does not split into prefix + word + suffix (is the word empty, or glued to "
            "the template's text?)"
        )
    return tokens, list(range(start, stop))


def word_token_features(
    model: nn.Module, tokenizer, template: str, words: Sequence[str], device: torch.device
) -> tuple[Tensor, Tensor]:
    """The L2-normalised features of each word's own tokens in its prompt, all words in one
    text forward (gradients flow if the model trains).

    Returns: (V, T, D) features, padded to the longest word, and the (V, T) bool mask of the
    real tokens (`entity_token_scores`' `word_mask`).
    """
    prompts = [word_token_positions(tokenizer, template, w) for w in words]
    tokens = torch.cat([t for t, _ in prompts]).to(device)  # (V, ctx)
    toks = token_features(model, tokens, normalize=True)  # (V, ctx, D)
    width = max(len(pos) for _, pos in prompts)
    index = torch.tensor([pos + [pos[-1]] * (width - len(pos)) for _, pos in prompts])  # (V, T)
    valid = torch.tensor([[i < len(pos) for i in range(width)] for _, pos in prompts])
    feats = toks.gather(1, index.to(device)[..., None].expand(-1, -1, toks.shape[-1]))
    return feats, valid.to(device)
