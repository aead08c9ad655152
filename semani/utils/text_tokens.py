"""CLIP BPE text-token conventions shared by the data side and the models.

Rows are ``[SOT] bpe_1 ... bpe_n [EOT] 0 ... 0`` (`semani.data.tokenizer`). Padding uses id 0,
which is also the BPE id of "!", so it is found through the EOT, never by comparing with 0.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["EOT_TOKEN", "text_padding_mask"]

EOT_TOKEN = 49407  # CLIP BPE end-of-text id


def text_padding_mask(tokens: Tensor, eot_token: int = EOT_TOKEN) -> Tensor:
    """(B, L) token ids -> (B, L) bool, True at the padding positions strictly after the first EOT.

    Rows without an EOT have no padding (all False). `eot_token` defaults to CLIP's 49407.
    """
    is_eot = (tokens == eot_token).long()  # (B, L)
    return (is_eot.cumsum(-1) - is_eot) > 0  # (B, L)
