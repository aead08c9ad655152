"""``GroundingSamSegmenter``: GroundingDINO boxes for the prompt word, each box prompting SAM.

The "Grounded-SAM" route, with transformers' models only:

1. the prompt word becomes GroundingDINO's caption (``prompt_template``, lowercased, ending in
   "." as GroundingDINO's demo writes it); without a word (e.g. the alignment study's word-free
   call) the caption is ``default_prompt``, "object." (assumed: a generic noun);
2. ``GroundingDinoForObjectDetection`` + its processor's
   ``post_process_grounded_object_detection``: a query is a box when its best token probability
   exceeds ``box_threshold``; ``text_threshold`` picks the caption tokens that make up the
   box's phrase (the proposal's name; it does not drop boxes, as in GroundingDINO's demo);
3. each box (clamped to the image) prompts ``SamModel`` (``input_boxes``, three masks per box);
   the mask with the highest predicted IoU is kept, binarised at SAM's logit 0;
4. ``finalize_proposals``: masks at the image's size, ``min_area_frac``, sorted by the box's
   detection score (the proposal score), at most ``max_proposals``.

Unlike the other segmenters it reads the prompt word: ``text_conditioned = True`` tells
``EntityAligner`` (and the alignment study) to call ``segment(image, sample, word=word)``, once
per distinct word. ``grounding_model`` and ``sam_model`` take hub ids (transformers downloads
them into the Hugging Face cache, or reads them from there offline: ``HF_HUB_OFFLINE=1``) or
folders, e.g. from ``python scripts/download_weights.py --only grounding-dino-tiny,sam-vit-base``
(``pretrained/grounding-dino-tiny``, ``pretrained/sam-vit-base``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from semani.alignment.segmenters.common import (
    ImageLike,
    Sample,
    finalize_proposals,
    image_size,
    to_uint8_image,
)
from semani.alignment.segmenters.hf_loading import from_pretrained, warn_allow_download
from semani.alignment.types import EntityProposals

log = logging.getLogger(__name__)

__all__ = ["GroundingSamSegmenter", "caption"]

HOW_TO_GET_GROUNDING = (
    "Get one with `python scripts/download_weights.py --only grounding-dino-tiny` (into "
    "pretrained/grounding-dino-tiny; grounding-dino-base works the same way)."
)
HOW_TO_GET_SAM = (
    "Get one with `python scripts/download_weights.py --only sam-vit-base` (into "
    "pretrained/sam-vit-base; sam-vit-large and sam-vit-huge work the same way)."
)


def caption(text: str) -> str:
    """GroundingDINO's caption form: stripped, lowercased, ending in "." ("Bird" -> "bird.")."""
    text = text.strip().lower()
    return text if text.endswith(".") else text + "."


class GroundingSamSegmenter:
    """Entity proposals for a prompt word: GroundingDINO's boxes, SAM's masks (module docstring).

    grounding_model, sam_model: ``save_pretrained`` folders (model + processor) or hub ids
        (downloaded into the Hugging Face cache; offline, read there). allow_download:
        deprecated and ignored (a hub id is always downloaded unless offline).
    device: where both models run. box_threshold: a GroundingDINO query becomes a box when its
        best token probability exceeds this. text_threshold: caption tokens above this make the
        box's phrase (the proposal's name).
    prompt_template: the caption for a word ("{word}."). default_prompt: the caption when no word
        is given. boxes_per_batch: boxes decoded by SAM per forward pass.
    min_area_frac, max_proposals: see ``finalize_proposals``.
    """

    text_conditioned = True  # segment() reads the prompt word: EntityAligner passes it

    def __init__(
        self,
        grounding_model: str | Path,
        sam_model: str | Path,
        allow_download: bool | None = None,
        device: str = "cpu",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        prompt_template: str = "{word}.",
        default_prompt: str = "object.",
        boxes_per_batch: int = 64,
        min_area_frac: float = 0.0,
        max_proposals: int | None = None,
    ) -> None:
        from transformers import (
            GroundingDinoForObjectDetection,
            GroundingDinoProcessor,
            SamModel,
            SamProcessor,
        )

        warn_allow_download(allow_download)  # deprecated: hub ids download unless offline
        if "{word}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{word}}', got {prompt_template!r}")
        if boxes_per_batch < 1:
            raise ValueError("boxes_per_batch must be >= 1")
        self.device = torch.device(device)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.prompt_template, self.default_prompt = prompt_template, default_prompt
        self.boxes_per_batch = boxes_per_batch
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        grounding_args = {"how_to_get": HOW_TO_GET_GROUNDING, "what": "grounding_model"}
        self.grounding_processor = from_pretrained(
            GroundingDinoProcessor, grounding_model, **grounding_args
        )
        grounding = from_pretrained(
            GroundingDinoForObjectDetection, grounding_model, **grounding_args
        )
        self.grounding_model = grounding.to(self.device).eval().requires_grad_(False)
        sam_args = {"how_to_get": HOW_TO_GET_SAM, "what": "sam_model"}
        self.sam_processor = from_pretrained(SamProcessor, sam_model, **sam_args)
        sam = from_pretrained(SamModel, sam_model, **sam_args)
        self.sam_model = sam.to(self.device).eval().requires_grad_(False)
        log.info(
            "loaded GroundingDINO from %s (%.1fM parameters) and SAM from %s (%.1fM) on %s",
            grounding_model,
            sum(p.numel() for p in grounding.parameters()) / 1e6,
            sam_model,
            sum(p.numel() for p in sam.parameters()) / 1e6,
            self.device,
        )

    def caption_for(self, word: str | None) -> str:
        """The GroundingDINO caption for `word` (``default_prompt`` when None)."""
        if word is None:
            return caption(self.default_prompt)
        return caption(self.prompt_template.format(word=word))

    @torch.no_grad()
    def detect(
        self, pixels: torch.Tensor, word: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(3, H, W) uint8 image -> GroundingDINO's boxes (N, 4) as (x0, y0, x1, y1) pixels
        clamped to the image, their scores (N,) and phrases, for `word`'s caption."""
        H, W = pixels.shape[-2:]
        inputs = self.grounding_processor(
            images=[pixels], text=[self.caption_for(word)], return_tensors="pt"
        )
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        outputs = self.grounding_model(**inputs)
        # positional: the box threshold's keyword is `box_threshold` before transformers 4.51
        (det,) = self.grounding_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], self.box_threshold, self.text_threshold, [(H, W)]
        )
        boxes = det["boxes"].float().cpu()  # (N, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        names = det["text_labels"] if "text_labels" in det else det["labels"]
        return boxes, det["scores"].float().cpu(), [str(n) for n in names]

    @torch.no_grad()
    def segment(
        self, image: ImageLike, sample: Sample | None = None, word: str | None = None
    ) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> proposals at (H, W) for what `word` names
        (None: ``default_prompt``'s generic objects); `sample` is not used."""
        size = image_size(image)
        pixels = to_uint8_image(image)  # (3, H, W) uint8; the processors rescale and normalise
        boxes, scores, names = self.detect(pixels, word)  # (N, 4), (N,)
        if not len(boxes):
            empty = torch.zeros(0, *size, dtype=torch.bool)
            return finalize_proposals(empty, torch.zeros(0), size, [])
        inputs = self.sam_processor(
            images=[pixels], input_boxes=[boxes.tolist()], return_tensors="pt"
        )
        embeddings = self.sam_model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        input_boxes = inputs["input_boxes"].to(self.device)  # (1, N, 4) at SAM's input size
        masks = []
        for start in range(0, input_boxes.shape[1], self.boxes_per_batch):
            out = self.sam_model(
                image_embeddings=embeddings,
                input_boxes=input_boxes[:, start : start + self.boxes_per_batch],
                multimask_output=True,
            )
            logits = out.pred_masks[0]  # (n, 3, h/4, w/4) low-resolution logits
            best = out.iou_scores[0].argmax(-1)  # (n,) the mask SAM rates best, per box
            logits = logits[torch.arange(len(best), device=best.device), best]  # (n, h/4, w/4)
            full = self.sam_processor.image_processor.post_process_masks(
                [logits[:, None]],
                inputs["original_sizes"],
                inputs["reshaped_input_sizes"],
                binarize=True,
            )[0][:, 0]  # (n, H, W) bool at the image's size
            masks.append(full.cpu())
        return finalize_proposals(
            torch.cat(masks), scores, size, names, self.min_area_frac, self.max_proposals
        )
