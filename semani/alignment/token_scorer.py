"""SeMani-Trans's token-wise (FILIP-style) entity scorer, as the authors' `evaluate.py` does it.

For one image, K entity masks and a prompt word:

1. image-token embeddings: the CLIP ViT's patch tokens after the final norm and the projection
   (class token dropped), L2-normalised, (N, D) on the CLIP's patch grid (h, w). The image is
   resized whole to the CLIP input size (bicubic, aspect not kept, nothing cropped away), so a
   mask maps to the grid by resizing alone;
2. word-token embeddings: the text tower's per-token features (after `ln_final` and the text
   projection) of "a photo of a {word}.", L2-normalised, keeping only the word's own tokens:
   after "<sot> a photo of a", before the full stop (positions 5 .. EOT-2 for the default
   template; for another template, after its prefix and before its suffix);
3. each mask goes to the patch grid with `mask_to_token_mask` (bilinear, "> 0"); a mask covering
   fewer than `min_cells` cells (4, as the authors) is not scored: NaN;
4. similarity of entity k = mean over its cells of (max over the word tokens of the cosine).

The image goes through the CLIP once for all K masks; word features are cached per word.
Selection (threshold 0.163, the paper's value for FILIP-large) is the aligner's job.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semani.alignment.scorers import as_image
from semani.alignment.types import EntityProposals
from semani.modules.clip import ClipModel
from semani.modules.clip_tokens import patch_features
from semani.modules.token_scores import (
    DEFAULT_TEMPLATE,
    entity_token_scores,
    word_token_features,
    word_token_positions,
)
from semani.utils.masks import mask_to_token_mask

__all__ = [
    "TokenWiseScorer",
    "entity_token_scores",
    "word_token_features",
    "word_token_positions",
]


class TokenWiseScorer(nn.Module):
    """Token-wise entity scorer on an open_clip ViT (FILIP-large in the paper).

    Args:
        model_name: open_clip architecture (a ViT).
        pretrained: CLIP weights as `ClipModel` takes them (None: random init).
        template: the prompt, with `{word}`; the word's tokens sit between its prefix and suffix.
        threshold: similarity further entities must reach (0.163: the paper's, for FILIP-large;
            other CLIPs need their own).
        min_cells: entities covering fewer patch-grid cells are not scored (NaN).
        selection: the aligner's default rule with this scorer ("threshold", as the paper).
        clip: an already built `ClipModel` (then `model_name`/`pretrained` are ignored).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        threshold: float | None = 0.163,
        min_cells: int = 4,
        selection: str = "threshold",
        clip: ClipModel | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip if clip is not None else ClipModel(model_name, pretrained)
        visual = self.clip.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise NotImplementedError(
                f"token-wise scoring needs an open_clip ViT; {self.clip.model_name} has "
                f"{type(visual).__name__}"
            )
        if "{word}" not in template:
            raise ValueError(f"template must contain '{{word}}', got {template!r}")
        tok = self.clip.tokenizer
        if not (hasattr(tok, "encode") and hasattr(tok, "eot_token_id")):
            raise NotImplementedError(
                f"word-token positions need open_clip's BPE tokenizer, {type(tok).__name__} given"
            )
        self.template = template
        self.threshold = threshold
        self.min_cells = int(min_cells)
        self.selection = selection
        self.grid: tuple[int, int] = tuple(visual.grid_size)
        self._words: dict[tuple[str, torch.device], Tensor] = {}

    # ---------------------------------------------------------------- text

    def word_positions(self, word: str) -> tuple[Tensor, list[int]]:
        """(1, context) token ids of the prompt and the positions of the word's own tokens."""
        tokens, pos = word_token_positions(self.clip.tokenizer, self.template, word)
        return tokens.to(self.clip.mean.device), pos

    @torch.no_grad()
    def word_features(self, word: str) -> Tensor:
        """(T, D) L2-normalised features of the word's own tokens in the prompt (cached)."""
        key = (word, self.clip.mean.device)
        if key not in self._words:
            feats, _ = word_token_features(
                self.clip.model, self.clip.tokenizer, self.template, [word], key[1]
            )  # (1, T, D), one word: no padding
            self._words[key] = feats[0].float()
        return self._words[key]

    # ---------------------------------------------------------------- image

    @torch.no_grad()
    def image_features(self, image: Tensor) -> Tensor:
        """(3, H, W) in [-1, 1] -> (N, D) L2-normalised patch-token embeddings (row-major grid)."""
        x = as_image(image).to(self.clip.mean.device)[None]  # (1, 3, H, W)
        if tuple(x.shape[-2:]) != self.clip.image_size:
            x = F.interpolate(
                x, size=self.clip.image_size, mode="bicubic", align_corners=False, antialias=True
            )  # (1, 3, h, w): the whole image, aspect not kept
        x = self.clip.preprocess(x)  # normalisation only: the size already fits
        return patch_features(self.clip.model, x, normalize=True)[0].float()  # (N, D)

    def token_masks(self, masks: Tensor) -> Tensor:
        """(K, H, W) bool -> (K, h, w) bool on the patch grid (bilinear, > 0)."""
        if masks.shape[0] == 0:
            return torch.zeros(0, *self.grid, dtype=torch.bool, device=masks.device)
        return mask_to_token_mask(masks, self.grid, threshold=0.0, min_tokens=0)

    # ---------------------------------------------------------------- score

    def encode(self, image: Tensor, proposals: EntityProposals) -> tuple[Tensor, Tensor]:
        """The word-independent part: the (N, D) patch embeddings and the (K, N) cells of each
        proposal (what `semani.alignment.cache` keeps per image)."""
        image = as_image(image, proposals)
        if len(proposals) == 0:
            return torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)
        patches = self.image_features(image)  # (N, D)
        cells = self.token_masks(proposals.masks.to(patches.device)).flatten(1)  # (K, N)
        return patches, cells

    def compare(self, features: tuple[Tensor, Tensor], word: str) -> Tensor:
        """`encode`'s features -> (K,) token-wise similarities to the word."""
        patches, cells = features
        if cells.shape[0] == 0:
            return torch.zeros(0)
        words = self.word_features(word)  # (T, D)
        return entity_token_scores(patches, words, cells, self.min_cells).cpu()

    def forward(self, image: Tensor, proposals: EntityProposals, word: str) -> Tensor:
        """-> (K,) token-wise similarities (NaN for entities under `min_cells` cells)."""
        return self.compare(self.encode(image, proposals), word)
