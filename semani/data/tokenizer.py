"""CLIP BPE text tokenizer (open_clip's ``SimpleTokenizer``, vocabulary 49408).

Every caption becomes a fixed-length row of ``context_length`` token ids (128 in the paper)::

    [SOT] bpe_1 ... bpe_n [EOT] 0 0 ... 0          (SOT = 49406, EOT = 49407, padding = 0)

- The text is cleaned and lower-cased exactly as open_clip does (ftfy, whitespace, lower case).
- A caption longer than ``context_length - 2`` BPE tokens is truncated to its first
  ``context_length`` tokens and the LAST position is overwritten with EOT, so every row holds
  exactly one EOT (truncation keeps EOT).
- Padding uses id 0, which is also the BPE id of "!"; padding is therefore located by the EOT
  position (``text_padding_mask``, defined in ``semani.utils.text_tokens`` and re-exported
  here), never by comparing with 0. The transformer replaces the padding positions with learned
  per-position padding embeddings; the text loss either ignores them or, as the authors' code,
  predicts a per-position pad class (``semani.modules.trans_losses``).

The result is token for token ``open_clip.tokenize(texts, context_length=L)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

from semani.utils.text_tokens import text_padding_mask

__all__ = ["TextTokenizer", "text_padding_mask"]


class TextTokenizer:
    """Fixed-length CLIP BPE tokenizer: ``tok(list_of_str) -> LongTensor (B, L)``."""

    vocab_size: int = 49408
    pad_token_id: int = 0

    def __init__(self, context_length: int = 128) -> None:
        if context_length < 2:
            raise ValueError(
                f"context_length must be >= 2 (room for SOT and EOT), got {context_length}"
            )
        self.context_length = int(context_length)
        self._bpe = SimpleTokenizer(context_length=self.context_length)
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id
        if len(self._bpe.encoder) != self.vocab_size:
            raise RuntimeError(
                f"open_clip's BPE vocabulary has {len(self._bpe.encoder)} entries, "
                f"expected {self.vocab_size}"
            )

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenize one string or a list of strings -> (B, context_length) long."""
        if isinstance(texts, str):
            texts = [texts]
        return self._bpe(list(texts), context_length=self.context_length)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT and without truncation."""
        return self._bpe.encode(text)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Token ids (L,) or (B, L) -> text, dropping SOT, EOT and everything after EOT."""
        t = torch.as_tensor(tokens)
        rows = t.reshape(1, -1) if t.ndim == 1 else t
        texts = []
        for row in rows.tolist():
            if row and row[0] == self.sot_token_id:
                row = row[1:]
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            texts.append(self._bpe.decode(row).strip())
        return texts[0] if t.ndim == 1 else texts
