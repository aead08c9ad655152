"""SeMani-Trans transformer: a decoder-only GPT over `[BOV] gray [BOT] text image` tokens.

nanoGPT-style, one file. Sequence layout (positions left to right):

    [BOV] g_0 .. g_{Lg-1} | [BOT] t_0 .. t_{Lt-1} | s_0 .. s_{Li-2}
    `----- gray segment (G = 1 + Lg, optional) -'

Logits are aligned with their targets: the output at `[BOV]` predicts g_0, at `[BOT]` predicts
t_0, at t_{Lt-1} predicts s_0, and so on. Grayscale (vision-guidance) tokens share the image
token and positional embeddings. Attention is causal, and additionally rows that predict text
never see the gray segment; rows that predict image tokens see it only for samples whose
`use_gray` is True. Without any guidance the gray segment is skipped entirely, which gives the
same logits for those samples (no positional embedding depends on the absolute position).

The cached path (`prefill` / `step` with a static `KVCache`) reuses the very same blocks and
embedding helpers as `forward`; `semani.manipulation.sampling` drives it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semani.utils.text_tokens import EOT_TOKEN, text_padding_mask

log = logging.getLogger(__name__)


@dataclass
class GPTConfig:
    """SeMani-Trans hyper-parameters; the defaults are the paper's size (~152.9M parameters)."""

    n_layer: int = 24  # paper: 24 layers
    n_head: int = 8  # paper: 8 heads x 64
    n_embd: int = 512  # paper: width 512
    text_vocab_size: int = 49408  # CLIP BPE vocabulary
    image_vocab_size: int = 1024  # VQGAN codebook size (ImageNet f16, 1024 codes)
    text_len: int = 128  # text tokens (CLIP BPE, padded)
    image_len: int = 256  # image tokens (16 x 16 grid)
    text_eot_token: int = EOT_TOKEN  # CLIP end-of-text; positions after it use the pad embedding
    dropout: float = 0.0  # embedding, attention and residual dropout
    ffn: str = "geglu"  # "geglu" (paper) | "gelu" (plain MLP, for comparisons with minGPT)
    # FFN hidden width; None -> 4 * n_embd (the authors' ff_mult=4). With GEGLU the first layer
    # is n_embd -> 2 * hidden (value and gate). At the paper size this gives ~152.9M:
    #   per block: qkv 3*512^2 = 786,432 (no bias) + attn proj 512^2+512 = 262,656
    #              + GEGLU in 512*4096+4096 = 2,101,248 + out 2048*512+512 = 1,049,088
    #              + 4 LayerNorms 4,096 + 2 LayerScales 1,024           = 4,204,544
    #   24 blocks                                                        = 100,909,056
    #   embeddings: text 49408*512 + text pos 128*512 + pad 128*512
    #               + image 1024*512 + image pos 256*512 + BOV/BOT 1,024 = 26,084,352
    #   ln_f 1,024 + text head 512*49408+49408 + image head 512*1024+1024 = 25,872,640
    #   total                                                            = 152,866,048
    # (The authors' code, lucidrains' DALLE-pytorch, does not tie text embedding and head.)
    ffn_hidden: int | None = None
    # The authors' text loss (DALL-E style, `text_loss="all_positions"`) predicts the padding:
    # pad position i is its own class `text_vocab_size + i`. True gives the text head those
    # `text_len` extra outputs: text_vocab_size + text_len = 49536 classes at the paper size, i.e.
    # 128 * (512 + 1) = 65,664 more parameters (152,931,712 in all; the authors' head has the
    # same 49408 + 128 rows). False (default): 49408 classes, for the non-padding text loss.
    text_pad_targets: bool = False
    sandwich_norm: bool = True  # authors: extra LayerNorm after each branch ("sandwich")
    layerscale: bool = True  # authors/CaiT: learnable per-channel residual branch scale
    # LayerScale init: "layer" = the authors' code (dalle_pytorch LayerScale(dim, ind + 1, ...)):
    # 0.1 for blocks 1..18, 1e-5 for 19..24, 1e-6 beyond, by the 1-based block index;
    # "depth" = CaiT: every block uses the value of the model depth. A float overrides both.
    layerscale_rule: str = "layer"
    layerscale_init: float | None = None
    init_std: float = 0.02  # nanoGPT weight init

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.ffn not in ("geglu", "gelu"):
            raise ValueError(f"ffn must be 'geglu' or 'gelu', got {self.ffn!r}")
        if self.layerscale_rule not in ("layer", "depth"):
            raise ValueError(
                f"layerscale_rule must be 'layer' or 'depth', got {self.layerscale_rule!r}"
            )

    @classmethod
    def tiny(cls, **overrides) -> GPTConfig:
        """A tiny configuration for tests (2 layers, width 64, 16 text and 4x4 image tokens)."""
        kw = dict(
            n_layer=2,
            n_head=4,
            n_embd=64,
            text_vocab_size=49408,
            image_vocab_size=64,
            text_len=16,
            image_len=16,
        )
        kw.update(overrides)
        return cls(**kw)


def layerscale_init_value(depth: int) -> float:
    """The authors' LayerScale init (dalle_pytorch.transformer.LayerScale) for `depth`."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


@dataclass
class GPTOutput:
    """Logits aligned with their targets (`logits[:, i]` predicts token i)."""

    text_logits: Tensor  # (B, Lt, Vt), Vt = text_vocab_size (+ text_len with text_pad_targets)
    image_logits: Tensor  # (B, Li, Vi)
    gray_logits: Tensor | None = None  # (B, Lg, Vi), None when the gray segment was skipped


@dataclass
class _Layout:
    """Where the segments are, and which samples use vision guidance."""

    gray_len: int  # G = 1 + Lg (BOV + gray tokens); 0 when the gray segment is skipped
    text_len: int  # Lt
    use_gray: Tensor | None  # (B,) bool, None when gray_len == 0
    all_gray: bool = False
    any_gray: bool = False

    @property
    def image_row_start(self) -> int:
        """First row whose output predicts an image token (the last text token)."""
        return self.gray_len + self.text_len

    def attn_mask(
        self, q_start: int, q_len: int, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """(mask (B|1, 1, Tq, Tk) bool, True = may attend, or None; is_causal) for SDPA."""
        k_len = q_start + q_len
        if self.gray_len == 0:
            if q_len == 1:
                return None, False  # one new row sees every cached key
            if q_start == 0:
                return None, True  # plain causal self-attention
        q_pos = torch.arange(q_start, k_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        causal = k_pos <= q_pos  # (Tq, Tk)
        if self.gray_len == 0:
            return causal[None, None], False  # (1, 1, Tq, Tk)
        k_gray = k_pos < self.gray_len  # (1, Tk)
        q_text = (q_pos >= self.gray_len) & (q_pos < self.image_row_start)  # (Tq, 1)
        q_image = q_pos >= self.image_row_start  # (Tq, 1)
        guided = causal & ~(k_gray & q_text)  # (Tq, Tk) image rows see the gray segment
        unguided = guided & ~(k_gray & q_image)  # (Tq, Tk) they do not
        if self.all_gray:
            return guided[None, None], False  # (1, 1, Tq, Tk)
        if not self.any_gray:
            return unguided[None, None], False  # (1, 1, Tq, Tk)
        use = self.use_gray[:, None, None, None]  # (B, 1, 1, 1)
        return torch.where(use, guided, unguided), False  # (B, 1, Tq, Tk)


class KVCache:
    """Static key/value cache: pre-allocated (n_layer, B, nh, T_max, hs) buffers, written in place.

    `length` is the number of positions written so far; `layout` is set by `SemaniGPT.prefill`.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, T_max, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, T_max, hs)
        self.max_len = max_len
        self.length = 0
        self.layout: _Layout | None = None
        self.step_key_mask: Tensor | None = None  # (B, 1, 1, T_max) for one-row steps

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at [start, start+T); return the keys/values [0, start+T)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)


@dataclass
class _AttnContext:
    mask: Tensor | None
    is_causal: bool
    cache: KVCache | None = None
    start: int = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and SDPA."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # authors: no bias
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx

    def forward(self, x: Tensor, ctx: _AttnContext) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, ctx.start, k, v)  # (B, nh, start+T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=ctx.is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    """GEGLU (value * GELU(gate), as the authors) or a plain GELU MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden or 4 * config.n_embd
        self.geglu = config.ffn == "geglu"
        self.c_fc = nn.Linear(config.n_embd, (2 if self.geglu else 1) * hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # (B, T, 2H) for GEGLU, (B, T, H) for GELU
        if self.geglu:
            h, gate = h.chunk(2, dim=-1)  # 2 x (B, T, H)
            h = h * F.gelu(gate)  # (B, T, H)
        else:
            h = F.gelu(h)  # (B, T, H)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Block(nn.Module):
    """Pre-norm block; optional post-norm ("sandwich") and LayerScale on both branches."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        C = config.n_embd
        self.ln_1 = nn.LayerNorm(C)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.post_ln_1 = nn.LayerNorm(C) if config.sandwich_norm else nn.Identity()
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = FeedForward(config)
        self.post_ln_2 = nn.LayerNorm(C) if config.sandwich_norm else nn.Identity()
        if config.layerscale:
            if config.layerscale_init is not None:
                init = config.layerscale_init
            elif config.layerscale_rule == "layer":
                init = layerscale_init_value(layer_idx + 1)
            else:
                init = layerscale_init_value(config.n_layer)
            self.ls_1, self.ls_2 = LayerScale(C, init), LayerScale(C, init)
        else:
            self.ls_1, self.ls_2 = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor, ctx: _AttnContext) -> Tensor:
        x = x + self.ls_1(self.post_ln_1(self.attn(self.ln_1(x), ctx)))  # (B, T, C)
        x = x + self.ls_2(self.post_ln_2(self.mlp(self.ln_2(x))))  # (B, T, C)
        return x


class SemaniGPT(nn.Module):
    """The SeMani-Trans transformer (see the module docstring for the sequence layout)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.text_tok_emb = nn.Embedding(config.text_vocab_size, C)
        self.text_pos_emb = nn.Embedding(config.text_len, C)
        self.text_pad_emb = nn.Embedding(config.text_len, C)  # DALL-E: one pad per position
        self.image_tok_emb = nn.Embedding(config.image_vocab_size, C)  # image and gray tokens
        # image and gray positions: a learned 1-D table over the 16x16 grid in raster order; the
        # authors' code uses an axial one (AxialPositionalEmbedding: row + column embeddings)
        self.image_pos_emb = nn.Embedding(config.image_len, C)
        self.bov = nn.Parameter(torch.zeros(C))  # [BOV]
        self.bot = nn.Parameter(torch.zeros(C))  # [BOT]
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.text_head = nn.Linear(C, self.text_classes)
        self.image_head = nn.Linear(C, config.image_vocab_size)

        self.apply(self._init_weights)
        nn.init.normal_(self.bov, std=config.init_std)
        nn.init.normal_(self.bot, std=config.init_std)
        for name, p in self.named_parameters():  # GPT-2 scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layer))
        log.info("SemaniGPT: %.2fM parameters", self.get_num_params() / 1e6)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- helpers

    @property
    def text_classes(self) -> int:
        """Outputs of the text head: the BPE vocabulary, plus one per position with pad targets."""
        cfg = self.config
        return cfg.text_vocab_size + (cfg.text_len if cfg.text_pad_targets else 0)

    def get_num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; `non_embedding` leaves out the positional embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.text_pos_emb.weight.numel() + self.image_pos_emb.weight.numel()
        return n

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups (nanoGPT): decay every >=2-D tensor, no decay on 1-D ones."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float = 989e12) -> float:
        """Model FLOPs utilisation (PaLM appendix B, as nanoGPT); peak default: H100 bf16."""
        cfg = self.config
        N, L, H = self.get_num_params(), cfg.n_layer, cfg.n_head
        Q, T = cfg.n_embd // cfg.n_head, cfg.text_len + cfg.image_len
        flops_per_iter = (6 * N + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # ---------------------------------------------------------------- embeddings

    def embed_text(self, text: Tensor) -> Tensor:
        """[BOT] + text tokens (B, Lt) -> (B, 1 + Lt, C); pad positions use the pad embedding."""
        B, Lt = text.shape
        pad = text_padding_mask(text, self.config.text_eot_token)  # (B, Lt)
        tok = self.text_tok_emb(text)  # (B, Lt, C)
        tok = torch.where(pad[..., None], self.text_pad_emb.weight[:Lt], tok)  # (B, Lt, C)
        x = tok + self.text_pos_emb.weight[:Lt]  # (B, Lt, C)
        bot = self.bot.expand(B, 1, -1)  # (B, 1, C)
        return torch.cat([bot, x], dim=1)  # (B, 1 + Lt, C)

    def embed_gray(self, gray: Tensor) -> Tensor:
        """[BOV] + grayscale tokens (B, Lg) -> (B, 1 + Lg, C) (image embeddings)."""
        bov = self.bov.expand(gray.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([bov, self.embed_image(gray)], dim=1)  # (B, 1 + Lg, C)

    def embed_image(self, image: Tensor, start: int = 0) -> Tensor:
        """Image tokens (B, L) at image positions [start, start+L) -> (B, L, C)."""
        L = image.shape[1]
        return self.image_tok_emb(image) + self.image_pos_emb.weight[start : start + L]

    # ---------------------------------------------------------------- full forward

    def _check(self, name: str, t: Tensor, max_len: int) -> None:
        if t.dim() != 2 or t.dtype != torch.long:
            raise ValueError(f"{name} must be a (B, L) LongTensor, got {tuple(t.shape)} {t.dtype}")
        if t.shape[1] > max_len:
            raise ValueError(f"{name} has {t.shape[1]} tokens > the config's {max_len}")

    def _layout(self, text: Tensor, gray: Tensor | None, use_gray: Tensor | None) -> _Layout:
        B = text.shape[0]
        if gray is None:
            if use_gray is not None and bool(use_gray.any()):
                raise ValueError("use_gray is True for some samples but gray is None: pass gray")
            return _Layout(0, text.shape[1], None)
        self._check("gray", gray, self.config.image_len)
        if gray.shape[0] != B:
            raise ValueError(f"gray batch {gray.shape[0]} != text batch {B}")
        if use_gray is None:
            use_gray = torch.ones(B, dtype=torch.bool, device=text.device)
        if use_gray.shape != (B,):
            raise ValueError(f"use_gray must be a (B,) bool tensor, got {tuple(use_gray.shape)}")
        use_gray = use_gray.to(device=text.device, dtype=torch.bool)
        return _Layout(
            1 + gray.shape[1],
            text.shape[1],
            use_gray,
            all_gray=bool(use_gray.all()),
            any_gray=bool(use_gray.any()),
        )

    def _run_blocks(self, x: Tensor, layout: _Layout, cache: KVCache | None = None) -> Tensor:
        """Blocks + final norm over x (B, T, C) at positions [start, start+T); start from cache."""
        start = cache.length if cache is not None else 0
        if cache is not None and x.shape[1] == 1:  # one image row: sees every cached key,
            mask, is_causal = cache.step_key_mask, False  # but the gray ones only if guided
            if mask is not None:
                mask = mask[..., : start + 1]  # (B, 1, 1, Tk)
        else:
            mask, is_causal = layout.attn_mask(start, x.shape[1], x.device)
        ctx = _AttnContext(mask, is_causal, cache, start)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, ctx)
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        gray: Tensor | None = None,
        use_gray: Tensor | None = None,
    ) -> GPTOutput:
        """Teacher-forced logits for text (B, Lt), image (B, Li) and optional gray (B, Lg) tokens.

        `use_gray` (B,) bool says which samples use vision guidance (default: all when `gray` is
        given). With `gray=None` the gray segment is skipped.
        """
        self._check("text", text, self.config.text_len)
        self._check("image", image, self.config.image_len)
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image batch {image.shape[0]} != text batch {text.shape[0]}")
        layout = self._layout(text, gray, use_gray)
        Lt, Li = text.shape[1], image.shape[1]
        parts = [self.embed_gray(gray)] if gray is not None else []
        parts += [self.embed_text(text), self.embed_image(image[:, : max(Li - 1, 0)])]
        x = torch.cat(parts, dim=1)  # (B, G + 1 + Lt + Li - 1, C)
        h = self._run_blocks(x, layout)  # (B, T, C)
        G = layout.gray_len
        gray_logits = self.image_head(h[:, : G - 1]) if gray is not None else None  # (B, Lg, Vi)
        text_logits = self.text_head(h[:, G : G + Lt])  # (B, Lt, Vt)
        image_logits = self.image_head(h[:, G + Lt : G + Lt + Li])  # (B, Li, Vi)
        return GPTOutput(text_logits, image_logits, gray_logits)

    # ---------------------------------------------------------------- cached inference

    def prefill_len(self, text_len: int, gray_len: int | None) -> int:
        """Prefix length: [BOV] gray [BOT] text (or [BOT] text when gray_len is None)."""
        return (0 if gray_len is None else 1 + gray_len) + 1 + text_len

    def prefill(
        self,
        text: Tensor,
        cache: KVCache,
        gray: Tensor | None = None,
        use_gray: Tensor | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """Run the prefix ([BOV] gray [BOT] text, plus known image tokens) into an empty cache.

        Returns the image logits (B, Vi) for the next image position (s_0 without `image`,
        else s_{image.shape[1]}).
        """
        if cache.length != 0:
            raise ValueError("prefill needs an empty KVCache (cache.length == 0)")
        self._check("text", text, self.config.text_len)
        layout = self._layout(text, gray, use_gray)
        parts = [self.embed_gray(gray)] if gray is not None else []
        parts.append(self.embed_text(text))
        if image is not None and image.shape[1] > 0:
            parts.append(self.embed_image(image))
        x = torch.cat(parts, dim=1)  # (B, T, C)
        cache.layout = layout
        cache.step_key_mask = None
        if layout.gray_len > 0 and not layout.all_gray:
            k_pos = torch.arange(cache.max_len, device=text.device)  # (T_max,)
            keep = (k_pos >= layout.gray_len)[None] | layout.use_gray[:, None]  # (B, T_max)
            cache.step_key_mask = keep[:, None, None, :]  # (B, 1, 1, T_max)
        h = self._run_blocks(x, layout, cache)  # (B, T, C)
        return self.image_head(h[:, -1])  # (B, Vi)

    def step(self, image: Tensor, cache: KVCache) -> Tensor:
        """Feed the next image tokens (B, n) after the cached ones; return logits (B, Vi) for
        the image position after them."""
        if cache.layout is None:
            raise ValueError("call prefill before step")
        start = cache.length - cache.layout.image_row_start - 1  # image position of image[:, 0]
        x = self.embed_image(image, start=start)  # (B, n, C)
        h = self._run_blocks(x, cache.layout, cache)  # (B, n, C)
        return self.image_head(h[:, -1])  # (B, Vi)

    def new_kv_cache(self, batch_size: int, with_gray: bool) -> KVCache:
        """A static cache long enough for a full image, matching the model's device and dtype."""
        cfg = self.config
        max_len = self.prefill_len(cfg.text_len, cfg.image_len if with_gray else None)
        max_len += cfg.image_len - 1
        p = self.image_head.weight
        return KVCache(cfg, batch_size, max_len, device=p.device, dtype=p.dtype)
