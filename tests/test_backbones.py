import urllib.error

import pytest
import torch

from models.backbones import MEAN_RGB, InputNorm, convert_torchvision_vgg16
from models.zoo import ModelSpec, build
from utils.errors import BanaError


def build_backbone(name, fc6_dilation=1, init="none", input_norm="auto"):
    """A backbone through the model front door (`models.zoo.build` of kind "backbone")."""
    return build(ModelSpec("backbone", name, fc6_dilation=fc6_dilation, input_norm=input_norm),
                 init)

# torchvision's vgg16 state dict shapes (features.<index>, classifier.<index>).
_VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
                14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                26: (512, 512), 28: (512, 512)}
_VGG16_FCS = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}


def _stride8(size, backbone):
    """Feature size for an input side `size`: VGG's pools (kernel 3, padding 1, rounding down)
    give floor((s - 1) / 2) + 1 = ceil(s/2) per pool, as do the strided convolutions of ResNet
    and tiny. (Caffe's ceil mode would give floor(s/2) + 1: 67 -> 34 -> 18 -> 10, not 9.)"""
    for _ in range(3):
        size = -(-size // 2)
    return size


@pytest.fixture(scope="session")
def torchvision_vgg16_state():
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (out_ch, in_ch) in _VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(out_ch, generator=g)
    for i, (out_f, in_f) in _VGG16_FCS.items():
        state[f"classifier.{i}.weight"] = torch.randn(out_f, in_f, generator=g)
        state[f"classifier.{i}.bias"] = torch.randn(out_f, generator=g)
    return state


@pytest.fixture(scope="session")
def torch_home_with_vgg16(tmp_path_factory, torchvision_vgg16_state):
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision_vgg16_state, home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    return home


@pytest.mark.parametrize("name,fc6_dilation,channels", [
    ("vgg16", 1, 1024), ("vgg16", 12, 1024),
    pytest.param("resnet101", 1, 256, marks=pytest.mark.slow), ("tiny", 1, 128)])
def test_forward_backward_at_stride_8(name, fc6_dilation, channels):
    torch.manual_seed(0)
    net = build_backbone(name, fc6_dilation=fc6_dilation)
    images = torch.rand(1, 3, 65, 67) * 255
    features = net(images)
    assert features.shape == (1, channels, _stride8(65, name), _stride8(67, name))
    assert net.out_channels == channels
    features.square().mean().backward()
    first = next(p for p in net.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_vgg16_layers_follow_deeplab_largefov():
    net = build_backbone("vgg16", fc6_dilation=12)
    pools = [m for m in net.features if isinstance(m, torch.nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding, p.ceil_mode) for p in pools] == \
        [(3, 2, 1, False)] * 3 + [(3, 1, 1, False)] * 2
    assert [net.features[i].dilation for i in (24, 26, 28)] == [(2, 2)] * 3
    assert net.fc6.dilation == (12, 12) and net.fc6.padding == (12, 12)
    assert net.fc6.weight.shape == (1024, 512, 3, 3) and net.fc7.weight.shape == (1024, 1024, 1, 1)
    assert net.new_modules() == []


def test_resnet101_head_is_the_only_new_module():
    net = build_backbone("resnet101")
    assert [m.dilation for m in net.new_modules()] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert net.body.layer4[1].conv2.dilation == (4, 4) and net.body.layer3[1].conv2.dilation == (2, 2)


def test_resnet101_dilates_every_block_as_deeplab_v2():
    """layer3: dilation 2 in all 23 blocks, layer4: 4 in all 3, the first blocks included
    (torchvision alone gives them 1 and 2); padding equals dilation so the size is kept."""
    net = build_backbone("resnet101")
    for layer, d in ((net.body.layer3, 2), (net.body.layer4, 4)):
        assert [(b.conv2.dilation, b.conv2.padding) for b in layer] == [((d, d), (d, d))] * len(layer)
        assert all(b.conv2.stride == (1, 1) for b in layer)
    assert [b.conv2.dilation for b in net.body.layer2] == [(1, 1)] * 4


def test_tiny_trains_a_batch_of_crops_quickly_enough_to_be_useful():
    net = build_backbone("tiny")
    features = net(torch.rand(8, 3, 96, 96) * 255)
    assert features.shape == (8, 128, 12, 12)
    features.mean().backward()


def test_vgg16_fc_decimation_takes_every_4th_output_and_every_3rd_tap(torchvision_vgg16_state):
    sd = torchvision_vgg16_state
    own = convert_torchvision_vgg16(sd)
    fc6 = sd["classifier.0.weight"]  # row o, column c*49 + y*7 + x
    expected_fc6 = torch.empty(1024, 512, 3, 3)
    for o in range(1024):
        for a, y in enumerate((0, 3, 6)):
            for b, x in enumerate((0, 3, 6)):
                expected_fc6[o, :, a, b] = fc6[4 * o, torch.arange(512) * 49 + y * 7 + x]
    assert torch.equal(own["fc6.weight"], expected_fc6)
    assert torch.equal(own["fc6.bias"], sd["classifier.0.bias"][torch.arange(1024) * 4])
    rows = torch.arange(1024) * 4
    assert torch.equal(own["fc7.weight"][:, :, 0, 0], sd["classifier.3.weight"][rows][:, rows])
    assert torch.equal(own["fc7.bias"], sd["classifier.3.bias"][rows])
    assert not any(k.startswith("classifier.") for k in own)
    assert torch.equal(own["features.28.weight"], sd["features.28.weight"])


def test_imagenet_init_reads_torch_home(monkeypatch, torch_home_with_vgg16, torchvision_vgg16_state):
    monkeypatch.setenv("TORCH_HOME", str(torch_home_with_vgg16))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    net = build_backbone("vgg16", init="imagenet")
    assert net.input_norm == "imagenet"
    assert torch.equal(net.features[0].weight, torchvision_vgg16_state["features.0.weight"])
    assert torch.equal(net.fc7.bias, torchvision_vgg16_state["classifier.3.bias"][::4])


def _no_network(url, *args, **kwargs):
    raise urllib.error.URLError("no network in tests")


@pytest.mark.parametrize("name,filename", [("vgg16", "vgg16-397923af.pth"),
                                           ("resnet101", "resnet101-63fe2227.pth")])
def test_imagenet_init_without_file_or_network_names_the_file(monkeypatch, tmp_path, name, filename):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(BanaError) as err:
        build_backbone(name, init="imagenet")
    assert str(tmp_path / "hub" / "checkpoints" / filename) in str(err.value)
    assert "MODEL.INIT" in str(err.value)


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(BanaError, match="no ImageNet weights"):
        build_backbone("tiny", init="imagenet")


def test_caffe_layout_loads_with_caffe_normalisation(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("vgg16")
    names = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    caffe = {}
    for name, index in zip(names, _VGG16_CONVS):
        caffe[f"{name}.weight"] = source.features[index].weight.detach()
        caffe[f"{name}.bias"] = source.features[index].bias.detach()
    for name in ("fc6", "fc7"):
        caffe[f"{name}.weight"] = getattr(source, name).weight.detach()
        caffe[f"{name}.bias"] = getattr(source, name).bias.detach()
    caffe["fc7.weight"] = caffe["fc7.weight"].view(1024, 1024)  # some converters store it flat
    caffe["fc8.weight"] = torch.zeros(21, 1024, 1, 1)
    torch.save(caffe, tmp_path / "vgg_caffe.pth")

    net = build_backbone("vgg16", init=str(tmp_path / "vgg_caffe.pth"))
    assert net.input_norm == "caffe"
    assert torch.equal(net.features[26].weight, caffe["conv5_2.weight"])
    assert torch.equal(net.fc6.weight, caffe["fc6.weight"])
    assert torch.equal(net.fc7.weight, source.fc7.weight)
    with pytest.raises(BanaError, match="contradicts"):
        build_backbone("vgg16", init=str(tmp_path / "vgg_caffe.pth"), input_norm="imagenet")


def test_own_layout_round_trip_keeps_the_normalisation(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("tiny", input_norm="caffe")
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    net = build_backbone("tiny", init=str(tmp_path / "tiny.pth")).eval()
    assert net.input_norm == "caffe"
    images = torch.rand(2, 3, 32, 32) * 255
    assert torch.equal(net(images), source.eval()(images))


def test_wrong_keys_are_reported(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "something.else": torch.zeros(1)},
               tmp_path / "bad.pth")
    with pytest.raises(BanaError, match="missing keys") as err:
        build_backbone("tiny", init=str(tmp_path / "bad.pth"))
    assert "something.else" in str(err.value)
    with pytest.raises(BanaError, match="not a file"):
        build_backbone("tiny", init=str(tmp_path / "absent.pth"))


def test_input_norm_constants():
    images = torch.rand(2, 3, 5, 5) * 255
    bgr_mean = torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)
    assert torch.allclose(InputNorm("caffe")(images), images.flip(1) - bgr_mean)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(InputNorm("imagenet")(images), (images / 255 - mean) / std, atol=1e-5)
    assert MEAN_RGB["caffe"] == (122.675, 116.669, 104.008)
    # The mean colour (padding) maps to zero under both normalisations.
    for kind in ("caffe", "imagenet"):
        pad = torch.tensor(MEAN_RGB[kind]).view(1, 3, 1, 1)
        assert InputNorm(kind)(pad).abs().max() < 1e-4


def test_input_norm_defaults_and_travels_with_the_state_dict():
    assert build_backbone("tiny").input_norm == "imagenet"
    caffe = build_backbone("tiny", input_norm="caffe")
    plain = build_backbone("tiny")
    plain.load_state_dict(caffe.state_dict())
    assert plain.input_norm == "caffe"
    with pytest.raises(BanaError, match="MODEL.BACKBONE"):
        build_backbone("vgg19")


def test_stage1_checkpoint_initialises_a_stage3_backbone(stage1_dir):
    """MODEL.INIT may name a stage checkpoint: its backbone (with its input normalisation) is
    loaded, whatever fc6 dilation the new network uses; nothing else is taken from it."""
    path = stage1_dir / "stage1" / "checkpoints" / "final.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    expected = {k[len("net.backbone."):]: v for k, v in ckpt["state_dict"].items()
                if k.startswith("net.backbone.")}
    net = build_backbone("tiny", init=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with pytest.raises(BanaError, match="do not fit"):
        build_backbone("vgg16", init=str(path))
