"""`scripts/convert_stackgan_inception.py`: StackGAN's TF Inception-v3 -> torchvision, same logits.

The TF network is StackGAN-inception-model's `inception/slim/inception_model.py` rebuilt with
`tf.compat.v1` variable scopes (hence the same variable names), random weights, saved as its
training saved it (raw variables, their moving averages, RMSProp slots, `global_step`) and run as
its `inception_score.py` runs it (the moving averages restored, 299 px input in [-1, 1]).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semani.metrics.classifiers import StackGANInceptionV3, stackgan_inception3
from semani.utils.checkpoint import CheckpointMismatchError
from tests.conftest import load_script

NUM_OUTPUTS = 51  # CUB: 50 classes + the background


conv = load_script("convert_stackgan_inception")


def _tf_inception_v3(tf, images, num_classes: int):
    """StackGAN's slim `inception_v3` for inference: (B, 299, 299, 3) -> (B, num_classes)."""
    v1 = tf.compat.v1
    moving = [v1.GraphKeys.GLOBAL_VARIABLES, v1.GraphKeys.MOVING_AVERAGE_VARIABLES]

    def var(name, shape, init, trainable=True):
        collections = None if trainable else moving  # slim's batch_norm collections
        return v1.get_variable(name, shape, initializer=init, trainable=trainable,
                               collections=collections)  # fmt: skip

    def conv2d(x, n, k, stride=1, padding="SAME", scope=None):  # conv, BatchNorm (no gamma), relu
        kh, kw = (k, k) if isinstance(k, int) else k
        fan_in = kh * kw * int(x.shape[-1])
        with v1.variable_scope(scope, "Conv"):
            w = var("weights", [kh, kw, int(x.shape[-1]), n],
                    v1.random_normal_initializer(stddev=math.sqrt(2 / fan_in)))  # fmt: skip
            y = tf.nn.conv2d(x, w, [1, stride, stride, 1], padding)
            with v1.variable_scope(None, "BatchNorm"):
                beta = var("beta", [n], v1.random_normal_initializer(stddev=0.1))
                mean = var("moving_mean", [n], v1.random_normal_initializer(stddev=0.1), False)
                variance = var("moving_variance", [n], v1.random_uniform_initializer(0.5, 1.5),
                               False)  # fmt: skip
            return tf.nn.relu(tf.nn.batch_normalization(y, mean, variance, beta, None, 1e-3))

    def fc(x, n, scope=None):
        with v1.variable_scope(scope, "FC"):
            fan_in = int(x.shape[-1])
            w = var("weights", [fan_in, n], v1.random_normal_initializer(stddev=fan_in**-0.5))
            return tf.matmul(x, w) + var("biases", [n], v1.random_normal_initializer(stddev=0.1))

    def chain(x, *specs):
        for spec in specs:
            x = conv2d(x, *spec)
        return x

    def mixed(x, scope, **branches):  # each branch in its own scope, concatenated in order
        with v1.variable_scope(scope):
            outs = []
            for name, branch in branches.items():
                with v1.variable_scope(name):
                    outs.append(branch(x))
            return tf.concat(outs, 3)

    def avg3(x):
        return tf.nn.avg_pool2d(x, 3, 1, "SAME")

    def max3(x):
        return tf.nn.max_pool2d(x, 3, 2, "VALID")

    def split(x, n):  # 1x3 and 3x1 side by side
        return tf.concat([conv2d(x, n, [1, 3]), conv2d(x, n, [3, 1])], 3)

    x = chain(images, (32, 3, 2, "VALID", "conv0"), (32, 3, 1, "VALID", "conv1"),
              (64, 3, 1, "SAME", "conv2"))  # fmt: skip
    x = chain(max3(x), (80, 1, 1, "VALID", "conv3"), (192, 3, 1, "VALID", "conv4"))
    x = max3(x)  # (B, 35, 35, 192)
    for scope, pool_n in [("mixed_35x35x256a", 32), ("mixed_35x35x288a", 64),
                          ("mixed_35x35x288b", 64)]:  # fmt: skip
        x = mixed(x, scope,
                  branch1x1=lambda x: conv2d(x, 64, 1),
                  branch5x5=lambda x: chain(x, (48, 1), (64, 5)),
                  branch3x3dbl=lambda x: chain(x, (64, 1), (96, 3), (96, 3)),
                  branch_pool=lambda x, n=pool_n: conv2d(avg3(x), n, 1))  # fmt: skip
    x = mixed(x, "mixed_17x17x768a",
              branch3x3=lambda x: conv2d(x, 384, 3, 2, "VALID"),
              branch3x3dbl=lambda x: chain(x, (64, 1), (96, 3), (96, 3, 2, "VALID")),
              branch_pool=max3)  # fmt: skip
    for scope, c7 in [("mixed_17x17x768b", 128), ("mixed_17x17x768c", 160),
                      ("mixed_17x17x768d", 160), ("mixed_17x17x768e", 192)]:  # fmt: skip
        x = mixed(x, scope,
                  branch1x1=lambda x: conv2d(x, 192, 1),
                  branch7x7=lambda x, c=c7: chain(x, (c, 1), (c, [1, 7]), (192, [7, 1])),
                  branch7x7dbl=lambda x, c=c7: chain(x, (c, 1), (c, [7, 1]), (c, [1, 7]),
                                                     (c, [7, 1]), (192, [1, 7])),
                  branch_pool=lambda x: conv2d(avg3(x), 192, 1))  # fmt: skip
    with v1.variable_scope("aux_logits"):  # (B, 17, 17, 768) -> (B, num_classes), unused here
        aux = tf.nn.avg_pool2d(x, 5, 3, "VALID")
        aux = conv2d(conv2d(aux, 128, 1, scope="proj"), 768, [5, 5], padding="VALID")
        fc(tf.reshape(aux, [-1, 768]), num_classes)
    x = mixed(x, "mixed_17x17x1280a",
              branch3x3=lambda x: chain(x, (192, 1), (320, 3, 2, "VALID")),
              branch7x7x3=lambda x: chain(x, (192, 1), (192, [1, 7]), (192, [7, 1]),
                                          (192, 3, 2, "VALID")),
              branch_pool=max3)  # fmt: skip
    for scope in ["mixed_8x8x2048a", "mixed_8x8x2048b"]:
        x = mixed(x, scope,
                  branch1x1=lambda x: conv2d(x, 320, 1),
                  branch3x3=lambda x: split(conv2d(x, 384, 1), 384),
                  branch3x3dbl=lambda x: split(chain(x, (448, 1), (384, 3)), 384),
                  branch_pool=lambda x: conv2d(avg3(x), 192, 1))  # fmt: skip
    with v1.variable_scope("logits"):  # (B, 8, 8, 2048) -> (B, num_classes); dropout: eval
        x = tf.nn.avg_pool2d(x, 8, 1, "VALID")
        return fc(tf.reshape(x, [-1, 2048]), num_classes, scope="logits")


def _save_stackgan_like_checkpoints(tf, folder: Path) -> list[Path]:
    """Random weights saved as StackGAN's training did, in TF's V1 and V2 formats."""
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        v1.set_random_seed(0)
        images = v1.placeholder(tf.float32, [None, 299, 299, 3], name="inputs")
        logits = _tf_inception_v3(tf, images, NUM_OUTPUTS)
        ema = v1.train.ExponentialMovingAverage(0.9999)
        averaged = v1.trainable_variables() + v1.moving_average_variables()
        ema.apply(averaged)
        step = v1.train.get_or_create_global_step()
        fc_w = [v for v in averaged if v.op.name == "logits/logits/weights"]
        v1.train.RMSPropOptimizer(0.1, momentum=0.9).minimize(
            tf.reduce_sum(logits), step, var_list=fc_w
        )  # RMSProp slots of one variable: training state the converter skips
        # averages 10% off the raw values (same signs, activations stay O(1) to the logits):
        # the evaluation must read the averages
        jitter = [v1.assign(ema.average(v), v * v1.random_uniform(v.shape, 0.9, 1.1))
                  for v in averaged]  # fmt: skip
        prefixes = [folder / "v1" / "model.ckpt", folder / "v2" / "model.ckpt"]
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(jitter)
            for version, prefix in zip([v1.train.SaverDef.V1, v1.train.SaverDef.V2], prefixes):
                prefix.parent.mkdir()
                saver = v1.train.Saver(write_version=version)
                saver.save(sess, str(prefix), write_meta_graph=False)
    return prefixes


def _tf_logits(tf, prefix: Path, images: np.ndarray) -> np.ndarray:
    """StackGAN's inception_score.py: the moving averages restored, logits of (B, 299, 299, 3)."""
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        inputs = v1.placeholder(tf.float32, [None, 299, 299, 3], name="inputs")
        logits = _tf_inception_v3(tf, inputs, NUM_OUTPUTS)
        saver = v1.train.Saver(v1.train.ExponentialMovingAverage(0.9999).variables_to_restore())
        with v1.Session() as sess:
            saver.restore(sess, str(prefix))
            return sess.run(logits, {inputs: images})


@pytest.mark.slow  # ~45 s on 2 CPU cores: random init and saving of 2 x 24M parameters
def test_tf_checkpoint_converts_to_the_same_logits(tmp_path: Path) -> None:
    # TF after torchvision (imported above), which loads triton: triton loaded after TF segfaults
    tf = pytest.importorskip("tensorflow", reason='needs TensorFlow: pip install -e ".[tf]"')
    v1_prefix, v2_prefix = _save_stackgan_like_checkpoints(tf, tmp_path)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    expected = _tf_logits(tf, v1_prefix, images)  # (2, 51)

    out = tmp_path / "pretrained" / "inception" / "stackgan_birds_inception_v3.pth"
    assert conv.main(["--ckpt", str(v1_prefix), "--out", str(out), "--num-classes", "51"]) == out
    clf = StackGANInceptionV3(out, num_classes=NUM_OUTPUTS - 1)
    assert clf.net.AuxLogits is not None  # StackGAN's graph has the aux head
    with torch.no_grad():
        logits = clf.net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()  # (2, 51)
    diff = float(np.abs(logits - expected).max())
    print(f"max |torch - TF| = {diff:.3g} (logits up to {np.abs(expected).max():.3g})")
    assert diff < 1e-4

    state = torch.load(out, weights_only=True)
    for key, value in conv.convert(conv.read_checkpoint(v2_prefix)).items():  # V2 == V1
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="51 outputs, expected 21"):
        conv.main(["--ckpt", str(v2_prefix), "--out", str(out), "--num-classes", "21"])


def _tf_values(state: dict[str, torch.Tensor], aux: bool) -> dict[str, np.ndarray]:
    """A torchvision state dict written back as StackGAN's TF variables (the inverse map)."""
    values = {}
    for key, name in conv.variable_map(aux).items():
        t = state[key]
        t = t.permute(2, 3, 1, 0) if t.ndim == 4 else (t.t() if t.ndim == 2 else t)
        values[name] = t.numpy().copy()
    return values


def test_variable_names_follow_stackgans_inception_model() -> None:
    expected = {  # spot checks against inception/slim/inception_model.py
        "Conv2d_1a_3x3.conv.weight": "conv0/weights",
        "Conv2d_4a_3x3.bn.running_var": "conv4/BatchNorm/moving_variance",
        "Mixed_5b.branch_pool.bn.bias": "mixed_35x35x256a/branch_pool/Conv/BatchNorm/beta",
        "Mixed_6e.branch7x7dbl_5.conv.weight": "mixed_17x17x768e/branch7x7dbl/Conv_4/weights",
        "Mixed_7a.branch7x7x3_4.conv.weight": "mixed_17x17x1280a/branch7x7x3/Conv_3/weights",
        "Mixed_7c.branch3x3dbl_3b.conv.weight": "mixed_8x8x2048b/branch3x3dbl/Conv_3/weights",
        "AuxLogits.conv0.conv.weight": "aux_logits/proj/weights",
        "AuxLogits.conv1.conv.weight": "aux_logits/Conv/weights",
        "AuxLogits.fc.weight": "aux_logits/FC/weights",
        "fc.bias": "logits/logits/biases",
    }
    names = conv.variable_map(aux=True)
    assert {k: names[k] for k in expected} == expected
    assert not any(k.startswith("AuxLogits.") for k in conv.variable_map(aux=False))


def test_convert_reads_the_averages_and_names_what_does_not_fit() -> None:
    torch.manual_seed(0)
    net = stackgan_inception3(NUM_OUTPUTS, aux_logits=True)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}  # fmt: skip
    for key in state:
        if key.endswith(".bn.weight"):
            state[key] = torch.ones_like(state[key])  # TF's batch norm has no gamma
    ema = _tf_values(state, aux=True)
    ema_name = "{}/ExponentialMovingAverage".format
    values = {ema_name(k): v for k, v in ema.items()}
    values |= {k: v + 1 for k, v in ema.items()}  # raw values: not what the evaluation reads
    values |= {"global_step": np.array(5000), "logits/logits/weights/RMSProp": np.zeros(1)}
    assert len(ema) == 4 * 96 + 2 * 2  # 96 BasicConv2d (5 stem, 89 mixed, 2 aux), 2 fc

    converted = conv.convert(values)
    assert converted.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(converted[key], state[key], rtol=0, atol=0)
    raw = conv.convert(values, average="raw")
    torch.testing.assert_close(raw["fc.bias"], state["fc.bias"] + 1)

    no_aux = {k: v for k, v in values.items() if not k.startswith("aux_logits/")}
    assert not any(k.startswith("AuxLogits.") for k in conv.convert(no_aux))

    stray = dict(values, **{ema_name("mixed_35x35x256a/branch1x1/Conv/biases"): np.zeros(64)})
    with pytest.raises(CheckpointMismatchError, match="not used: mixed_35x35x256a/branch1x1/C"):
        conv.convert(stray)
    gap = dict(values)
    del gap[ema_name("mixed_8x8x2048b/branch3x3dbl/Conv_3/BatchNorm/moving_variance")]
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint: mixed_8x8x2"):
        conv.convert(gap)
    partial_aux = {k: v for k, v in values.items() if not k.startswith("aux_logits/FC")}
    with pytest.raises(CheckpointMismatchError, match="aux_logits/FC/biases"):
        conv.convert(partial_aux)
    with pytest.raises(CheckpointMismatchError, match="51 outputs, expected 21"):
        conv.convert(values, num_outputs=21)
    with pytest.raises(CheckpointMismatchError, match="try --average raw"):
        conv.convert(ema)  # raw values only
