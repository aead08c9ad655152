"""Convert StackGAN's fine-tuned TF Inception-v3 to a torchvision Inception3 state dict:

    pip install -e ".[tf]"
    python scripts/convert_stackgan_inception.py \
        --ckpt inception_finetuned_models/birds_valid299/model.ckpt \
        --out pretrained/inception/stackgan_birds_inception_v3.pth --num-classes 51
    python scripts/convert_stackgan_inception.py \
        --ckpt inception_finetuned_models/flowers_valid299/model.ckpt \
        --out pretrained/inception/stackgan_flowers_inception_v3.pth --num-classes 21

The file is what `semani.metrics.classifiers.StackGANInceptionV3` loads (configs/metrics/cub.yaml,
oxford.yaml). The checkpoints (github.com/hanzhanggit/StackGAN-inception-model) hold the old
"slim" Inception-v3 of tensorflow/models' `inception/` (`inception/slim/inception_model.py`), not
tf.contrib.slim's `InceptionV3/...`: `conv0/weights`, `conv0/BatchNorm/{beta,moving_mean,
moving_variance}` (no gamma: slim's batch norm has `scale=False`, epsilon 0.001),
`mixed_35x35x256a/branch5x5/Conv_1/...` (`Conv`, `Conv_1`, ... in call order within a branch),
`aux_logits/{proj,Conv,FC}/...` and `logits/logits/{weights,biases}` with num_classes = the data
set's classes + 1 (label 0, the background). StackGAN's `inception_score.py` restores every
variable's exponential moving average (`<name>/ExponentialMovingAverage`, the batch-norm
statistics too): so does this script (`--average raw` reads the raw values instead). `global_step`
and the optimizer's slots are skipped; any other variable left unused, and any torchvision key
left unfilled, is an error that names them. Conv kernels HWIO -> OIHW, fc matrices (in, out) ->
(out, in), bn.weight = 1 (or gamma where a checkpoint has it).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from semani.metrics.classifiers import StackGANInceptionV3, stackgan_inception3
from semani.utils.atomic import atomic_path
from semani.utils.checkpoint import CheckpointMismatchError

log = logging.getLogger(__name__)

EMA_SUFFIX = "/ExponentialMovingAverage"
# what the training left beside the model: the step and RMSProp's (or momentum's) slots
TRAINING_STATE = re.compile(r"(^global_step$)|(/(RMSProp|RMSProp_1|Momentum)$)")

STEM = {
    "conv0": "Conv2d_1a_3x3",  # 299 -> 149, 32
    "conv1": "Conv2d_2a_3x3",  # 147, 32
    "conv2": "Conv2d_2b_3x3",  # 147, 64
    "conv3": "Conv2d_3b_1x1",  # 73, 80
    "conv4": "Conv2d_4a_3x3",  # 71, 192
}
# per block kind, a TF branch scope -> the torchvision convs its `Conv`, `Conv_1`, ... are
BRANCHES = {
    "A": {
        "branch1x1": ["branch1x1"],
        "branch5x5": ["branch5x5_1", "branch5x5_2"],
        "branch3x3dbl": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
        "branch_pool": ["branch_pool"],
    },
    "B": {
        "branch3x3": ["branch3x3"],
        "branch3x3dbl": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    },
    "C": {
        "branch1x1": ["branch1x1"],
        "branch7x7": ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
        "branch7x7dbl": [f"branch7x7dbl_{i}" for i in range(1, 6)],
        "branch_pool": ["branch_pool"],
    },
    "D": {
        "branch3x3": ["branch3x3_1", "branch3x3_2"],
        "branch7x7x3": [f"branch7x7x3_{i}" for i in range(1, 5)],
    },
    "E": {
        "branch1x1": ["branch1x1"],
        "branch3x3": ["branch3x3_1", "branch3x3_2a", "branch3x3_2b"],
        "branch3x3dbl": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b"],
        "branch_pool": ["branch_pool"],
    },
}
MIXED = [  # TF scope, torchvision block, block kind
    ("mixed_35x35x256a", "Mixed_5b", "A"),
    ("mixed_35x35x288a", "Mixed_5c", "A"),
    ("mixed_35x35x288b", "Mixed_5d", "A"),
    ("mixed_17x17x768a", "Mixed_6a", "B"),
    ("mixed_17x17x768b", "Mixed_6b", "C"),
    ("mixed_17x17x768c", "Mixed_6c", "C"),
    ("mixed_17x17x768d", "Mixed_6d", "C"),
    ("mixed_17x17x768e", "Mixed_6e", "C"),
    ("mixed_17x17x1280a", "Mixed_7a", "D"),  # TF's name kept "to not void previous checkpoints"
    ("mixed_8x8x2048a", "Mixed_7b", "E"),
    ("mixed_8x8x2048b", "Mixed_7c", "E"),
]
AUX_CONVS = {"aux_logits/proj": "AuxLogits.conv0", "aux_logits/Conv": "AuxLogits.conv1"}
FCS = {"logits/logits": "fc", "aux_logits/FC": "AuxLogits.fc"}


def conv_scopes(aux: bool) -> dict[str, str]:
    """TF conv scope (weights + BatchNorm) -> torchvision `BasicConv2d` prefix."""
    scopes = dict(STEM)
    for tf_block, tv_block, kind in MIXED:
        for branch, convs in BRANCHES[kind].items():
            for i, conv in enumerate(convs):
                scopes[f"{tf_block}/{branch}/{'Conv' if i == 0 else f'Conv_{i}'}"] = (
                    f"{tv_block}.{conv}"
                )
    if aux:
        scopes.update(AUX_CONVS)
    return scopes


def variable_map(aux: bool) -> dict[str, str]:
    """torchvision key -> TF variable, for every key a TF variable fills (not bn.weight and
    num_batches_tracked, which TF's graph does not have)."""
    out = {}
    for scope, prefix in conv_scopes(aux).items():
        out[f"{prefix}.conv.weight"] = f"{scope}/weights"
        out[f"{prefix}.bn.bias"] = f"{scope}/BatchNorm/beta"
        out[f"{prefix}.bn.running_mean"] = f"{scope}/BatchNorm/moving_mean"
        out[f"{prefix}.bn.running_var"] = f"{scope}/BatchNorm/moving_variance"
    for scope, prefix in FCS.items():
        if aux or not scope.startswith("aux_logits/"):
            out[f"{prefix}.weight"] = f"{scope}/weights"
            out[f"{prefix}.bias"] = f"{scope}/biases"
    return out


def _to_torch(value: np.ndarray) -> Tensor:
    """A TF array in torch's layout: conv HWIO -> OIHW, fc (in, out) -> (out, in)."""
    t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if t.ndim == 4:
        return t.permute(3, 2, 0, 1).contiguous()
    return t.t().contiguous() if t.ndim == 2 else t


def _names(names: list[str] | set[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert(
    values: Mapping[str, np.ndarray], average: str = "ema", num_outputs: int | None = None
) -> dict[str, Tensor]:
    """StackGAN's TF Inception-v3 variables (name -> array) -> a torchvision Inception3 state
    dict for `stackgan_inception3`.

    Args:
        values: every variable of the checkpoint (training state included or not).
        average: "ema": the `<name>/ExponentialMovingAverage` values StackGAN's evaluation
            restores; "raw": the variables themselves.
        num_outputs: the fc outputs expected (the TF graph's num_classes); None: read them.
    """
    if average not in ("ema", "raw"):
        raise ValueError(f"average must be 'ema' or 'raw', got {average!r}")
    model = {k: v for k, v in values.items() if not TRAINING_STATE.search(k)}
    ema = {k[: -len(EMA_SUFFIX)]: v for k, v in model.items() if k.endswith(EMA_SUFFIX)}
    raw = {k: v for k, v in model.items() if not k.endswith(EMA_SUFFIX)}
    source = ema if average == "ema" else raw
    if not source:
        other = "raw" if average == "ema" else "ema"
        raise CheckpointMismatchError(
            f"the checkpoint has no {'moving-average' if average == 'ema' else 'raw'} values of "
            f"the model variables; try --average {other}"
        )
    known = set(ema) | set(raw)  # the model's variable names
    aux = any(k.startswith("aux_logits/") for k in known)
    logits_b = source.get("logits/logits/biases")
    if logits_b is None:
        raise CheckpointMismatchError(
            "no 'logits/logits/biases' in the checkpoint: not StackGAN's Inception-v3 "
            f"(inception/slim/inception_model.py); its variables: {_names(known)}"
        )
    n_out = int(logits_b.shape[0])
    if num_outputs is not None and n_out != num_outputs:
        raise CheckpointMismatchError(
            f"the checkpoint's logits have {n_out} outputs, expected {num_outputs}"
        )

    target = stackgan_inception3(n_out, aux_logits=aux).state_dict()
    mapping = variable_map(aux)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    absent: list[str] = []
    for key, ref in target.items():
        prefix, _, leaf = key.rpartition(".")
        if key in mapping:
            name = mapping[key]
            if name not in source:
                absent.append(name + (EMA_SUFFIX if average == "ema" else ""))
                continue
            value = _to_torch(source[name])
            used.add(name)
        elif leaf == "weight" and prefix.endswith(".bn"):  # scale=False: gamma = 1
            gamma = mapping[f"{prefix}.bias"].replace("/beta", "/gamma")
            value = _to_torch(source[gamma]) if gamma in source else torch.ones_like(ref)
            used.add(gamma)
        elif leaf == "num_batches_tracked":
            value = torch.zeros_like(ref)
        else:
            continue  # reported as not filled below
        if value.shape != ref.shape:
            raise CheckpointMismatchError(
                f"'{key}': TF's {mapping.get(key, key)} gives {tuple(value.shape)}, torchvision "
                f"expects {tuple(ref.shape)}"
            )
        state[key] = value
    unused = known - used
    unfilled = [k for k in target if k not in state]
    if absent or unused or unfilled:
        raise CheckpointMismatchError(
            "StackGAN Inception-v3 conversion failed:"
            + (f"\n  missing from the checkpoint: {_names(absent)}" if absent else "")
            + (f"\n  TF variables not used: {_names(unused)}" if unused else "")
            + (f"\n  torchvision keys not filled: {_names(unfilled)}" if unfilled else "")
        )
    log.info("converted %d TF variables (%s values) into %d torchvision keys; %d outputs, "
             "aux logits %s", len(used & known), average, len(state), n_out,
             "kept" if aux else "absent")  # fmt: skip
    return state


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every model variable of a TF checkpoint (prefix of a V2 checkpoint, a V1 file or a
    folder with a `checkpoint` file); `global_step` and optimizer slots are left out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF comes after torchvision (imported above with the classifiers), which loads triton:
    # triton loaded after TF segfaults
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            'reading a TF checkpoint needs TensorFlow: pip install -e ".[tf]" '
            '(or pip install "tensorflow-cpu>=2.12")'
        ) from err
    p = Path(path)
    if not (p.exists() or Path(f"{p}.index").is_file()):
        raise FileNotFoundError(f"no TF checkpoint at '{p}' (neither the file nor '{p}.index')")
    reader = tf.train.load_checkpoint(str(p))
    names = sorted(reader.get_variable_to_shape_map())
    skipped = [n for n in names if TRAINING_STATE.search(n)]
    log.info("%s: %d variables, %d of them training state (skipped)", p, len(names), len(skipped))
    return {n: reader.get_tensor(n) for n in names if not TRAINING_STATE.search(n)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", type=Path, required=True,
        help="TF checkpoint: prefix (model.ckpt, model.ckpt-5000), V1 file or folder",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the .pth state dict to write")
    parser.add_argument(
        "--num-classes", type=int, default=None,
        help="the TF graph's num_classes, background included (51 birds, 21 flowers); "
        "checked against the checkpoint (default: read from it)",
    )  # fmt: skip
    parser.add_argument(
        "--average", choices=("ema", "raw"), default="ema",
        help="ema: the moving averages StackGAN's inception_score.py restores (default)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = convert(read_checkpoint(args.ckpt), args.average, args.num_classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        torch.save(state, tmp)
    n_out = state["fc.weight"].shape[0]
    StackGANInceptionV3(args.out, num_classes=n_out - 1)  # loads as the metric will
    log.info("wrote %s (%d classes + background)", args.out, n_out - 1)
    return args.out


if __name__ == "__main__":
    main()
