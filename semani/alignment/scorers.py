"""Entity scorers: (image, proposals, word) -> (K,) similarities, one per proposal.

A scorer is any callable with that signature and two attributes the aligner reads:
`selection` ("threshold" or "argmax", the paper's rule for this scorer) and `threshold` (the
similarity a further entity must reach under threshold selection; may be None for argmax-only
scorers). A proposal the scorer cannot score (an empty mask, a mask under the scorer's own
minimum size) gets NaN.

- `semani.alignment.token_scorer.TokenWiseScorer`: SeMani-Trans, FILIP-style token-wise.
- `MaskPromptScorer`: SeMani-Diff, OVSeg's mask-prompted CLIP on masked entity crops.
- `MaskedCropClipScorer`: the same crops through the plain CLIP (no mask prompt), for studies.

Prompts are `template.format(word=word)`, "a photo of a {word}." by default.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from semani.alignment.types import EntityProposals
from semani.data.transforms import from_uint8
from semani.modules.clip import ClipModel
from semani.modules.mask_clip import MaskPromptCLIP
from semani.modules.token_scores import DEFAULT_TEMPLATE

__all__ = [
    "DEFAULT_TEMPLATE",
    "EntityScorer",
    "MaskPromptScorer",
    "MaskedCropClipScorer",
    "as_image",
]


@runtime_checkable
class EntityScorer(Protocol):
    """(image (3, H, W) in [-1, 1], proposals at (H, W), word) -> (K,) similarities (NaN: not
    scored). The scorers here also split the call into `encode(image, proposals)` (the
    word-independent features) and `compare(features, word)`, which `EntityAligner`'s cache
    uses to score a second word on the same image without the image tower."""

    selection: str
    threshold: float | None

    def __call__(self, image: Tensor, proposals: EntityProposals, word: str) -> Tensor: ...


def as_image(image: Tensor, proposals: EntityProposals | None = None) -> Tensor:
    """(3, H, W) or (1, 3, H, W), float in [-1, 1] or uint8 -> (3, H, W) float in [-1, 1].

    With `proposals`, also checks that their masks are at the image's size.
    """
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [-1, 1], got {tuple(image.shape)}")
    image = from_uint8(image) if image.dtype == torch.uint8 else image.float()
    if proposals is not None and proposals.size != tuple(image.shape[-2:]):
        raise ValueError(
            f"proposal masks are {proposals.size} but the image is {tuple(image.shape[-2:])}; "
            "masks must be at the image's own size"
        )
    return image


class _TextCache:
    """Normalised text embeddings of `template.format(word=...)`, computed once per word."""

    def __init__(self, template: str) -> None:
        if "{word}" not in template:
            raise ValueError(f"template must contain '{{word}}', got {template!r}")
        self.template = template
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    def __call__(self, clip: ClipModel, word: str) -> Tensor:
        key = (word, clip.mean.device)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = clip.encode_text([self.template.format(word=word)])[0]  # (D,)
        return self._cache[key]


class MaskPromptScorer(nn.Module):
    """SeMani-Diff's scorer: cosine between the mask-prompted CLIP embedding of each masked
    entity crop and the CLIP text embedding of the prompt; all K crops in one forward.

    Args:
        model_name, pretrained, depth, ovseg_ckpt, square, region: see `MaskPromptCLIP`.
        template: the prompt, with `{word}`.
        threshold: similarity further entities must reach under threshold selection (the paper
            uses argmax for SeMani-Diff, so None by default).
        selection: the aligner's default rule with this scorer.
        model: an already built `MaskPromptCLIP` (then the model arguments are ignored).
        mask_prompt: a tuned prompt for `pretrained`'s CLIP (`mask_prompt.pt` of
            `experiment=mask_prompt_*`); None with `pretrained`: the untuned (zero) prompt.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        ovseg_ckpt: str | None = None,
        depth: int = 3,
        square: bool = False,
        template: str = DEFAULT_TEMPLATE,
        threshold: float | None = None,
        selection: str = "argmax",
        model: MaskPromptCLIP | None = None,
        mask_prompt: str | None = None,
        region: str = "box",
    ) -> None:
        super().__init__()
        self.model = (
            model
            if model is not None
            else MaskPromptCLIP(
                model_name,
                pretrained,
                depth=depth,
                ovseg_ckpt=ovseg_ckpt,
                square=square,
                mask_prompt=mask_prompt,
                region=region,
            )
        )
        self.text = _TextCache(template)
        self.threshold = threshold
        self.selection = selection

    mask_prompt = True  # the crops go through the mask-prompted CLIP

    @torch.no_grad()
    def encode(self, image: Tensor, proposals: EntityProposals) -> Tensor:
        """The word-independent part: (K, D) embeddings of the masked crops (what
        `semani.alignment.cache` keeps per image)."""
        image = as_image(image, proposals)
        if len(proposals) == 0:
            return torch.zeros(0, 0)
        return self.model.encode_entities(image, proposals.masks, mask_prompt=self.mask_prompt)

    @torch.no_grad()
    def compare(self, features: Tensor, word: str) -> Tensor:
        """`encode`'s (K, D) -> (K,) cosine similarities to the word's prompt."""
        if features.shape[0] == 0:
            return torch.zeros(0)
        return (features @ self.text(self.model.clip, word)).cpu()  # (K,)

    def forward(self, image: Tensor, proposals: EntityProposals, word: str) -> Tensor:
        """-> (K,) cosine similarities (NaN for empty masks)."""
        return self.compare(self.encode(image, proposals), word)


class MaskedCropClipScorer(nn.Module):
    """The plain CLIP on the same masked crops (no mask prompt): the study's baseline.

    Args are those of `MaskPromptScorer` without the prompt ones; `clip` reuses a `ClipModel`.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        square: bool = False,
        template: str = DEFAULT_TEMPLATE,
        threshold: float | None = None,
        selection: str = "argmax",
        clip: ClipModel | None = None,
        region: str = "box",
    ) -> None:
        super().__init__()
        clip = clip if clip is not None else ClipModel(model_name, pretrained)
        # depth 0: the plain CLIP
        self.model = MaskPromptCLIP(clip=clip, depth=0, square=square, region=region)
        self.text = _TextCache(template)
        self.threshold = threshold
        self.selection = selection

    mask_prompt = False  # the same crops through the plain CLIP
    encode, compare = MaskPromptScorer.encode, MaskPromptScorer.compare
    forward = MaskPromptScorer.forward
