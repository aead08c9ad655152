"""The paper-run experiments compose to the training stages of paper §4.1 and the authors' code.

Pre-training on CC12M "without language and vision guidance"; fine-tuning step 1 with the
semantic loss and no vision guidance, step 2 with vision guidance on 50% of the samples; the
optimiser numbers lost from the paper's text from the authors' SeMani-Trans scripts.
"""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import semani  # noqa: F401  (registers the config resolvers)
from tests.conftest import CONFIG_DIR, compose

FINETUNE = ["semani_trans_cub", "semani_trans_oxford", "semani_trans_coco"]
ABLATIONS = [f"{name}_no_semantic_loss" for name in FINETUNE]
PAPER = ["semani_trans_cc12m_pretrain", *FINETUNE, *ABLATIONS]


def test_pretraining_has_no_language_and_no_vision_guidance(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=semani_trans_cc12m_pretrain"], tmp_path)
    assert cfg.model.vg_prob == 0
    assert cfg.model.lambda_sem == 0
    assert cfg.model.clip is None
    assert cfg.model.init_ckpt is None  # from scratch
    assert cfg.data.batch_size == 112  # the global batch
    assert cfg.trainer.max_epochs == 12
    sched = cfg.model.scheduler
    assert (sched.warmup_steps, sched.patience, sched.interval) == (5000, 50000, "step")


@pytest.mark.parametrize("experiment", FINETUNE + ABLATIONS)
def test_finetuning_steps(experiment: str, tmp_path: Path) -> None:
    ablation = experiment.endswith("_no_semantic_loss")
    step1 = compose("train", [f"experiment={experiment}"], tmp_path)
    step2 = compose(
        "train", [f"experiment={experiment}", "finetune=step2", "step1_ckpt=/s1.ckpt"], tmp_path
    )
    # step 1: no vision guidance, from the CC12M transformer; step 2: guidance on 50%, from step 1
    assert step1.model.vg_prob == 0.0
    assert step1.model.init_ckpt.endswith("semani_trans_cc12m.ckpt")
    assert step2.model.vg_prob == 0.5
    assert step2.model.init_ckpt == "/s1.ckpt"
    for cfg in (step1, step2):
        # the semantic loss (CLIP ViT-B/32) stays on in both steps, off in the ablations
        if ablation:
            assert cfg.model.lambda_sem == 0 and cfg.model.clip is None
        else:
            assert cfg.model.lambda_sem == 5.0 and cfg.model.clip.model_name == "ViT-B-32"
        assert cfg.data.batch_size == 96  # global
        assert cfg.trainer.max_epochs == 500
        sched = cfg.model.scheduler
        assert (sched.warmup_steps, sched.patience, sched.interval) == (1000, 10, "epoch")
        assert cfg.model.gpt.dropout == 0.1  # authors' fine-tuning command


@pytest.mark.parametrize("experiment", PAPER)
def test_authors_optimisation_and_text_loss(experiment: str, tmp_path: Path) -> None:
    overrides = [f"experiment={experiment}"]
    cfg = compose("train", overrides, tmp_path)
    opt, sched = cfg.model.optimizer, cfg.model.scheduler
    assert opt.lr == 5e-4 and list(opt.betas) == [0.9, 0.96] and opt.weight_decay == 1e-3
    assert (sched.warmup_start_factor, sched.factor, sched.min_lr) == (0.1, 0.5, 1e-6)
    assert cfg.trainer.gradient_clip_val == 4.0
    # the authors' text loss, with the pad classes it needs in the text head
    assert cfg.model.text_loss == "all_positions" and cfg.model.gpt.text_pad_targets is True
    assert (cfg.model.lambda_txt, cfg.model.lambda_img, cfg.model.lambda_vg) == (1.0, 7.0, 1.0)


@pytest.mark.parametrize("experiment", PAPER)
def test_example_commands_pass_no_per_gpu_batch(experiment: str) -> None:
    """data.batch_size is the global batch: the commands at the top must not split it by hand."""
    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert "data.batch_size=" not in text
    assert "per GPU" not in text


def test_paper_model_builds_with_the_authors_text_loss() -> None:
    """A tiny GPT with the paper configs' text settings: the pad classes are targets (their bias
    gradient pushes them up), whereas the non-padding loss only ever pushes them down."""
    import torch

    from semani.modules.gpt import GPTConfig, SemaniGPT, text_padding_mask
    from semani.modules.trans_losses import SemaniTransLoss

    paper = OmegaConf.load(CONFIG_DIR / "model" / "semani_trans.yaml")
    cfg = GPTConfig.tiny(text_pad_targets=paper.gpt.text_pad_targets)
    text = torch.randint(1, 1000, (2, cfg.text_len))
    text[:, 3], text[:, 4:] = cfg.text_eot_token, 0  # padding from position 4 on
    image = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    pad = text_padding_mask(text, cfg.text_eot_token)
    pad_classes = slice(cfg.text_vocab_size + 4, cfg.text_vocab_size + cfg.text_len)
    for mode, sign in ((paper.text_loss, -1), ("non_padding", 1)):
        torch.manual_seed(0)
        gpt = SemaniGPT(cfg)
        crit = SemaniTransLoss(text_loss=mode, lambda_sem=0)
        out = gpt(text, image)
        losses = crit(out.text_logits, out.image_logits, None, text, image, pad)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        assert (torch.sign(gpt.text_head.bias.grad[pad_classes]) == sign).all(), mode


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_trains_with_the_authors_text_loss() -> None:
    """SemaniTransModule with the paper's text settings on a tiny model; without the pad classes
    in the GPT the first step is a clear error."""
    import torch

    from semani.data.tokenizer import TextTokenizer
    from semani.models.semani_trans import SemaniTransModule

    vq = {
        "n_embed": 64, "embed_dim": 16,
        "ddconfig": {
            "double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0,
        },
    }  # fmt: skip
    gpt = {"n_layer": 1, "n_head": 2, "n_embd": 32, "image_vocab_size": 64, "text_len": 16,
           "image_len": 64}  # fmt: skip
    torch.manual_seed(0)
    batch = {
        "image": torch.rand(2, 3, 32, 32) * 2 - 1,
        "tokens": TextTokenizer(16)(["a red circle", "a small blue square on grey"]),
    }
    common = dict(vqgan={"config": vq}, clip=None, lambda_sem=0.0, text_loss="all_positions")
    module = SemaniTransModule(gpt={**gpt, "text_pad_targets": True}, **common)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert module.gpt.text_head.weight.grad is not None

    with pytest.raises(ValueError, match="text_pad_targets"):  # a head without pad classes
        SemaniTransModule(gpt=gpt, **common)
