"""The authors' ResNet-101 v1 for DeepLab-V2 (models/resnet_v1.py): architecture against a plain
functional reference, sizes against torchvision's v1.5 variant, state-dict layouts."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models.backbones import ResNet101DeepLabV2
from models.resnet_v1 import ResNet101V1DeepLabV2
from utils.errors import BanaError

_BLOCKS = (3, 4, 23, 3)
_BGR_MEAN = (104.008, 116.669, 122.675)
_RATES = (6, 12, 18, 24)


# ---------------------------------------------------------------------------------------------
# ResNet-101 from its description, in the layouts of the DeepLab-V2 ports (built here, not from
# the module under test): a stem 7×7 conv, then stages of [3, 4, 23, 3] bottlenecks with
# mid = 64·2^s and out = 4·mid channels, a projection shortcut in each stage's first block.

def _convs():
    """(stage, block, branch, conv weight shape); stage None is the stem, branch "a"/"b"/"c" the
    1×1 / 3×3 / 1×1 convolutions, "proj" the shortcut."""
    yield None, None, None, (64, 3, 7, 7)
    in_ch = 64
    for stage, n in enumerate(_BLOCKS):
        mid = 64 * 2 ** stage
        out = 4 * mid
        for block in range(n):
            cin = in_ch if block == 0 else out
            yield stage, block, "a", (mid, cin, 1, 1)
            yield stage, block, "b", (mid, mid, 3, 3)
            yield stage, block, "c", (out, mid, 1, 1)
            if block == 0:
                yield stage, block, "proj", (out, cin, 1, 1)
        in_ch = out


def _kazuto_names(stage, block, branch, shortcut="shortcut"):
    """(conv, bn) module names in kazuto1011/deeplab-pytorch's and the BANA authors' Layers.py:
    layer1 is the stem, layer2..layer5 the stages, blocks counted from 1."""
    if stage is None:
        return "layer1.conv1.conv", "layer1.conv1.bn"
    unit = {"a": "reduce", "b": "conv3x3", "c": "increase", "proj": shortcut}[branch]
    name = f"layer{stage + 2}.block{block + 1}.{unit}"
    return f"{name}.conv", f"{name}.bn"


def _isht7_names(stage, block, branch):
    """(conv, bn) module names in isht7/pytorch-deeplab-resnet: torchvision's behind `Scale.`."""
    if stage is None:
        return "Scale.conv1", "Scale.bn1"
    name = f"Scale.layer{stage + 1}.{block}"
    if branch == "proj":
        return f"{name}.downsample.0", f"{name}.downsample.1"
    i = "abc".index(branch) + 1
    return f"{name}.conv{i}", f"{name}.bn{i}"


def _random_resnet101(names, prefix="", *, batches_tracked=False, dtype=torch.float32, seed=0):
    """A random ResNet-101 state dict: He-scaled convolutions and random (not default) BatchNorm
    affine parameters and running statistics, every tensor distinct."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for stage, block, branch, shape in _convs():
        conv, bn = (prefix + n for n in names(stage, block, branch))
        fan_in = shape[1] * shape[2] * shape[3]
        c = shape[0]
        state[f"{conv}.weight"] = torch.randn(shape, generator=g, dtype=dtype) * (2 / fan_in) ** 0.5
        # Residual branches end small so that 33 blocks keep the activations in range.
        low, high = (0.1, 0.3) if branch == "c" else (0.5, 1.0)
        state[f"{bn}.weight"] = torch.empty(c, dtype=dtype).uniform_(low, high, generator=g)
        state[f"{bn}.bias"] = torch.randn(c, generator=g, dtype=dtype) * 0.1
        state[f"{bn}.running_mean"] = torch.randn(c, generator=g, dtype=dtype) * 0.1
        state[f"{bn}.running_var"] = torch.empty(c, dtype=dtype).uniform_(0.5, 2.0, generator=g)
        if batches_tracked:
            state[f"{bn}.num_batches_tracked"] = torch.tensor(7)
    return state


def _authors_deeplab_aspp(dtype=torch.float32, seed=0):
    """The BANA authors' `DeepLab_ASPP` state dict: `backbone.` + Layers.py names, c1..c4 (the
    head), classifier (21 classes)."""
    state = _random_resnet101(_kazuto_names, "backbone.", dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(1, 5):
        state[f"c{i}.weight"] = torch.randn(256, 2048, 3, 3, generator=g, dtype=dtype) * 0.01
    state["classifier.weight"] = torch.randn(21, 256, 1, 1, generator=g, dtype=dtype) * 0.01
    return state


def _with_norm(net, own):
    """`own` plus the net's normalisation buffers: a complete state dict for a strict load."""
    return {**own, **{f"normalize.{k}": v for k, v in net.normalize.state_dict().items()}}


# ---------------------------------------------------------------------------------------------
# The slow, obvious reference: the authors' network written out with functional ops.

def _conv_bn(x, state, name, *, stride=1, padding=0, dilation=1, relu=True):
    x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding, dilation=dilation)
    x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                     state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], training=False, eps=1e-5)
    return F.relu(x) if relu else x


def _reference_features(state, images):
    """DeepLab_ASPP.get_features from the authors' description, on RGB 0..255 images, with
    `state` in `_authors_deeplab_aspp`'s layout. Caffe input: BGR minus the mean. Stem: 7×7/2
    conv + BN + ReLU, 3×3/2 max-pool rounding up. Stages: strides 1, 2, 1, 1 and dilations 1, 1,
    2, 4 in every block; the stride sits in the first 1×1 (and the 1×1 shortcut). Head: ReLU of
    the sum of four 3×3 convs at rates 6, 12, 18, 24."""
    x = images.flip(1) - torch.tensor(_BGR_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    x = _conv_bn(x, state, "backbone.layer1.conv1", stride=2, padding=3)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
    for stage, (n, stride, dilation) in enumerate(zip(_BLOCKS, (1, 2, 1, 1), (1, 1, 2, 4))):
        for block in range(n):
            name = f"backbone.layer{stage + 2}.block{block + 1}"
            s = stride if block == 0 else 1
            h = _conv_bn(x, state, f"{name}.reduce", stride=s)
            h = _conv_bn(h, state, f"{name}.conv3x3", padding=dilation, dilation=dilation)
            h = _conv_bn(h, state, f"{name}.increase", relu=False)
            shortcut = _conv_bn(x, state, f"{name}.shortcut", stride=s, relu=False) if block == 0 else x
            x = F.relu(h + shortcut)
    return F.relu(sum(F.conv2d(x, state[f"c{i + 1}.weight"], padding=r, dilation=r)
                      for i, r in enumerate(_RATES)))


@pytest.mark.slow
def test_matches_the_authors_network_written_out_with_functional_ops():
    """Full-size network, float64, odd 63×47 input (its stem output 32×24 is even, so the pool's
    rounding matters: 9×7 features here, 8×6 with torchvision's floor)."""
    state = _authors_deeplab_aspp(dtype=torch.float64)
    net = ResNet101V1DeepLabV2(input_norm="caffe").double().eval()
    own, norm = net.convert_state_dict(state)
    assert norm == "caffe"
    net.load_state_dict(_with_norm(net, own))
    images = torch.rand(1, 3, 63, 47, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64) * 255
    with torch.no_grad():
        features = net(images)
        expected = _reference_features(state, images)
    assert features.shape == expected.shape == (1, 256, 9, 7)
    assert 0.1 < (expected > 0).double().mean() < 0.9  # a non-trivial map
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# v1 against torchvision's v1.5 (ResNet101DeepLabV2).

def _v1_side(size):
    """Per side: 7×7/2 conv (padding 3) -> ceil(s/2); 3×3/2 ceil-mode pool -> floor(c/2) + 1;
    stride-2 1×1 -> ceil(p/2)."""
    c = -(-size // 2)
    p = c // 2 + 1
    return p, -(-p // 2)


def _v15_side(size):
    c = -(-size // 2)
    p = -(-c // 2)
    return p, -(-p // 2)


def test_v1_and_v15_hold_the_same_tensors():
    torch.manual_seed(0)
    v1, v15 = ResNet101V1DeepLabV2(), ResNet101DeepLabV2()
    assert [(k, v.shape) for k, v in v1.state_dict().items()] == \
        [(k, v.shape) for k, v in v15.state_dict().items()]
    v15.load_state_dict(v1.state_dict())
    assert torch.equal(v15.body.layer3[22].conv2.weight, v1.body.layer3[22].conv2.weight)
    v1.load_state_dict(ResNet101DeepLabV2().state_dict())
    # torchvision's own names under body., as the v1.5 class expects them.
    tv = torchvision.models.resnet101(weights=None).state_dict()
    assert {k for k in v1.state_dict() if k.startswith("body.")} == \
        {f"body.{k}" for k in tv if not k.startswith("fc.")}


@pytest.mark.parametrize("h,w,v1_size,v15_size", [
    (320, 320, (41, 41), (40, 40)),
    (321, 321, (41, 41), (41, 41)),   # the authors' crop: same size, other sampling grid
    (375, 500, (48, 63), (47, 63)),   # a VOC landscape image (W×H 500×375)
    (63, 47, (9, 7), (8, 6)),
])
def test_feature_sizes_differ_from_v15_by_the_ceil_mode_pool(h, w, v1_size, v15_size):
    """Shapes only, on the meta device (no arithmetic); the formulas say the same."""
    assert (_v1_side(h)[1], _v1_side(w)[1]) == v1_size
    assert (_v15_side(h)[1], _v15_side(w)[1]) == v15_size
    with torch.device("meta"):
        v1, v15 = ResNet101V1DeepLabV2(), ResNet101DeepLabV2()
        images = torch.empty(1, 3, h, w)
    assert v1(images).shape == (1, 256, *v1_size)
    assert v15(images).shape == (1, 256, *v15_size)


def test_pooled_stem_of_a_500x375_image_is_126x95_against_125x94():
    """Real arithmetic on the cheap part: the stem (conv, BN, ReLU, pool) of both variants."""
    torch.manual_seed(0)
    v1, v15 = ResNet101V1DeepLabV2().eval(), ResNet101DeepLabV2().eval()
    images = torch.rand(1, 3, 375, 500) * 255
    with torch.no_grad():
        p1 = v1.body[:4](v1.normalize(images))
        p15 = v15.body[:4](v15.normalize(images))
    assert p1.shape == (1, 64, 95, 126) and (_v1_side(375)[0], _v1_side(500)[0]) == (95, 126)
    assert p15.shape == (1, 64, 94, 125) and (_v15_side(375)[0], _v15_side(500)[0]) == (94, 125)
    # With the same weights the rounded-up pool only adds a last row and column.
    v15.load_state_dict(v1.state_dict())
    with torch.no_grad():
        p15 = v15.body[:4](v15.normalize(images))
    assert torch.equal(p1[:, :, :94, :125], p15)


# ---------------------------------------------------------------------------------------------
# The authors' choices, module by module.

@pytest.fixture(scope="module")
def v1_net():
    torch.manual_seed(0)
    return ResNet101V1DeepLabV2()


def test_every_batchnorm_has_the_authors_momentum(v1_net):
    norms = [m for m in v1_net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 3 * sum(_BLOCKS) + len(_BLOCKS)
    assert {(m.momentum, m.eps) for m in norms} == {(0.999, 1e-5)}
    # PyTorch's convention: new running mean = 0.001·old + 0.999·batch mean.
    bn = nn.BatchNorm2d(4, momentum=v1_net.body.bn1.momentum).train()
    bn.running_mean.fill_(10.0)
    x = torch.randn(2, 4, 5, 5)
    bn(x)
    torch.testing.assert_close(bn.running_mean, 0.001 * 10.0 + 0.999 * x.mean(dim=(0, 2, 3)))


def test_stem_pool_rounds_up_and_the_stride_sits_in_the_first_1x1(v1_net):
    body = v1_net.body
    pool = body.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, True)
    first = body.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv1.kernel_size == (1, 1)
    assert first.conv2.stride == (1, 1)
    assert first.downsample[0].stride == (2, 2)
    strided = sorted(name for name, m in body.named_modules()
                     if isinstance(m, nn.Conv2d) and m.stride != (1, 1))
    assert strided == ["conv1", "layer2.0.conv1", "layer2.0.downsample.0"]


def test_dilations_and_head_follow_deeplab_v2(v1_net):
    body = v1_net.body
    layers = (body.layer1, body.layer2, body.layer3, body.layer4)
    assert [len(layer) for layer in layers] == list(_BLOCKS)
    for layer, d in zip(layers, (1, 1, 2, 4)):
        assert [(b.conv2.dilation, b.conv2.padding) for b in layer] == [((d, d), (d, d))] * len(layer)
        # A projection shortcut in the first block only.
        assert [b.downsample is not None for b in layer] == [True] + [False] * (len(layer) - 1)
    assert v1_net.new_modules() == list(v1_net.head)
    assert [(c.dilation, c.padding, c.bias) for c in v1_net.head] == \
        [((r, r), (r, r), None) for r in _RATES]
    assert all(c.weight.shape == (256, 2048, 3, 3) for c in v1_net.head)
    assert 0.008 < torch.stack([c.weight.std() for c in v1_net.head]).mean() < 0.012
    assert v1_net.out_channels == 256


# ---------------------------------------------------------------------------------------------
# State-dict layouts.

def test_own_layout_passes_through(v1_net):
    state = v1_net.state_dict()
    own, norm = v1_net.convert_state_dict(state)
    assert own is state and norm is None


def test_torchvision_resnet101_converts_and_loads_strictly():
    torch.manual_seed(0)
    tv = torchvision.models.resnet101(weights=None).state_dict()
    net = ResNet101V1DeepLabV2()
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    own, norm = net.convert_state_dict(tv)
    assert norm == "imagenet"
    assert not any(k.startswith(("fc.", "body.fc.")) for k in own)
    net.load_state_dict(_with_norm(net, own))
    loaded = net.state_dict()
    for k, v in tv.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[f"body.{k}"], v), k
    for k, v in head.items():  # no head in the file: the module's own initialisation is kept
        assert torch.equal(loaded[k], v), k
    # Older torchvision files have no num_batches_tracked.
    old = {k: v for k, v in tv.items() if not k.endswith("num_batches_tracked")}
    own, _ = net.convert_state_dict(old)
    net.load_state_dict(_with_norm(net, own))
    assert net.body.layer3[5].bn2.num_batches_tracked.item() == 0


_CAFFE_LAYOUTS = {
    # kazuto1011/deeplab-pytorch deeplabv1_resnet101-coco.pth: no prefix, an `fc` classifier.
    "kazuto_coco": dict(names=_kazuto_names, prefix="", batches_tracked=True,
                        extra={"fc.weight": (91, 2048, 1, 1), "fc.bias": (91,)}),
    # kazuto1011/deeplab-pytorch deeplabv2_resnet101_msc-vocaug.pth: MSC's `base.`, ASPP c0..c3.
    "kazuto_msc": dict(names=_kazuto_names, prefix="base.", batches_tracked=False,
                       extra={f"base.aspp.c{i}.{p}": s for i in range(4)
                              for p, s in (("weight", (21, 2048, 3, 3)), ("bias", (21,)))}),
    # kazuto1011/deeplab-pytorch in 2017: MSC's `scale.`, shortcut named `proj`.
    "kazuto_2017": dict(names=lambda *a: _kazuto_names(*a, shortcut="proj"), prefix="scale.",
                        batches_tracked=False,
                        extra={f"scale.aspp.stages.c{i}.weight": (21, 2048, 3, 3) for i in range(4)}),
    # isht7/pytorch-deeplab-resnet MS_DeepLab_resnet_pretrained_COCO_init.pth.
    "isht7": dict(names=_isht7_names, prefix="", batches_tracked=False,
                  extra={f"Scale.layer5.conv2d_list.{i}.{p}": s for i in range(4)
                         for p, s in (("weight", (21, 2048, 3, 3)), ("bias", (21,)))}),
}

# (our key, kazuto1011 name, isht7 name) for spot checks by value.
_SPOT = [
    ("body.conv1.weight", "layer1.conv1.conv.weight", "Scale.conv1.weight"),
    ("body.bn1.running_var", "layer1.conv1.bn.running_var", "Scale.bn1.running_var"),
    ("body.layer1.0.bn2.weight", "layer2.block1.conv3x3.bn.weight", "Scale.layer1.0.bn2.weight"),
    ("body.layer2.0.conv1.weight", "layer3.block1.reduce.conv.weight", "Scale.layer2.0.conv1.weight"),
    ("body.layer2.0.downsample.1.running_mean", "layer3.block1.{sc}.bn.running_mean",
     "Scale.layer2.0.downsample.1.running_mean"),
    ("body.layer3.4.conv2.weight", "layer4.block5.conv3x3.conv.weight", "Scale.layer3.4.conv2.weight"),
    ("body.layer3.22.bn3.bias", "layer4.block23.increase.bn.bias", "Scale.layer3.22.bn3.bias"),
    ("body.layer4.0.downsample.0.weight", "layer5.block1.{sc}.conv.weight",
     "Scale.layer4.0.downsample.0.weight"),
]


def _caffe_state(layout):
    spec = _CAFFE_LAYOUTS[layout]
    state = _random_resnet101(spec["names"], spec["prefix"], batches_tracked=spec["batches_tracked"])
    state.update((k, torch.randn(s)) for k, s in spec["extra"].items())
    return state


@pytest.mark.parametrize("layout", sorted(_CAFFE_LAYOUTS))
def test_caffe_layouts_convert_load_strictly_and_land_in_place(layout):
    spec = _CAFFE_LAYOUTS[layout]
    state = _caffe_state(layout)
    net = ResNet101V1DeepLabV2()
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    own, norm = net.convert_state_dict(state)
    assert norm == "caffe"
    net.load_state_dict(_with_norm(net, own))
    loaded = net.state_dict()
    shortcut = "proj" if layout == "kazuto_2017" else "shortcut"
    for ours, kazuto, isht7 in _SPOT:
        source = isht7 if layout == "isht7" else spec["prefix"] + kazuto.format(sc=shortcut)
        assert torch.equal(loaded[ours], state[source]), (ours, source)
    tracked = loaded["body.layer3.7.bn1.num_batches_tracked"].item()
    assert tracked == (7 if spec["batches_tracked"] else 0)
    for k, v in head.items():
        assert torch.equal(loaded[k], v), k


def test_the_authors_deeplab_aspp_brings_its_head():
    state = _authors_deeplab_aspp()
    net = ResNet101V1DeepLabV2()
    own, norm = net.convert_state_dict(state)
    assert norm == "caffe" and "classifier.weight" not in own
    net.load_state_dict(_with_norm(net, own))
    for i in range(4):
        assert torch.equal(net.head[i].weight, state[f"c{i + 1}.weight"])
    assert torch.equal(net.body.layer4[2].conv3.weight,
                       state["backbone.layer5.block3.increase.conv.weight"])


def test_the_zoo_reads_a_caffe_file_with_caffe_inputs(tmp_path):
    """Through the project's model front door: strict load, input norm from the layout, a
    contradicting MODEL.INPUT_NORM refused."""
    from models.zoo import ModelSpec, build

    state = {k: v.half() for k, v in _caffe_state("isht7").items()}  # half the bytes on disk
    torch.save(state, tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth")
    path = str(tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth")
    net = build(ModelSpec("backbone", "resnet101"), init=path)
    assert isinstance(net, ResNet101V1DeepLabV2) and net.input_norm == "caffe"
    assert torch.equal(net.body.layer3[9].conv1.weight, state["Scale.layer3.9.conv1.weight"].float())
    with pytest.raises(BanaError, match="contradicts"):
        build(ModelSpec("backbone", "resnet101", input_norm="imagenet"), init=path)


@pytest.mark.parametrize("layout", ["kazuto_msc", "isht7"])
def test_missing_wrong_shape_and_unknown_tensors_are_named(layout):
    net = ResNet101V1DeepLabV2()
    prefix = _CAFFE_LAYOUTS[layout]["prefix"]
    if layout == "isht7":
        gone, bad, extra = ("Scale.layer3.6.bn2.running_var", "Scale.layer2.0.downsample.0.weight",
                            "Scale.layer3.23.conv1.weight")
    else:
        gone, bad, extra = (f"{prefix}layer4.block7.conv3x3.bn.running_var",
                            f"{prefix}layer3.block1.shortcut.conv.weight",
                            f"{prefix}layer4.block24.reduce.conv.weight")

    state = _caffe_state(layout)
    del state[gone]
    with pytest.raises(BanaError, match="1 missing keys") as err:
        net.convert_state_dict(state)
    assert gone in str(err.value) and "ResNet-101" in str(err.value)

    state = _caffe_state(layout)
    state[bad] = torch.zeros(512, 256, 3, 3)
    with pytest.raises(BanaError, match="1 with the wrong shape") as err:
        net.convert_state_dict(state)
    assert f"{bad} is (512, 256, 3, 3), expected (512, 256, 1, 1)" in str(err.value)

    state = _caffe_state(layout)  # a ResNet-152 has more blocks in this stage
    state[extra] = torch.zeros(256, 1024, 1, 1)
    with pytest.raises(BanaError, match="1 unexpected keys") as err:
        net.convert_state_dict(state)
    assert extra in str(err.value)


def test_a_state_dict_of_no_known_layout_is_refused(v1_net):
    vgg = {"conv1_1.weight": torch.zeros(64, 3, 3, 3), "fc6.weight": torch.zeros(1)}
    with pytest.raises(BanaError, match="fits no ResNet-101 layout") as err:
        v1_net.convert_state_dict(vgg)
    message = str(err.value)
    assert "conv1_1.weight" in message
    assert all(s in message for s in ("torchvision", "kazuto1011", "isht7", "layer1.conv1.conv.weight"))
    tv = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}
    with pytest.raises(BanaError, match="torchvision resnet101") as err:
        v1_net.convert_state_dict(tv)  # ResNet-50: layer3 stops at block 5
    assert "layer3.6.conv1.weight" in str(err.value)
