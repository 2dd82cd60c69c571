import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.deeplab import DeepLab, freeze_bn
from models.zoo import ModelSpec, build


def build_deeplab(name, num_classes, frozen_bn=False):
    """DeepLab-LargeFOV (vgg16, fc6 dilation 12), DeepLab-V2 (resnet101) or tiny, random init."""
    return build(ModelSpec("deeplab", name, num_classes, frozen_bn=frozen_bn,
                           fc6_dilation=12 if name == "vgg16" else 1))


@pytest.mark.parametrize("name,channels", [
    ("vgg16", 1024), pytest.param("resnet101", 256, marks=pytest.mark.slow)])
def test_forward_backward_gives_cosines(name, channels):
    torch.manual_seed(0)
    model = build_deeplab(name, 21)
    assert model.classifier.weight.shape == (21, channels, 1, 1) and model.classifier.bias is None
    if name == "vgg16":
        assert model.backbone.fc6.dilation == (12, 12)
    images = torch.rand(1, 3, 65, 65) * 255
    cos = model(images)
    assert cos.shape == (1, 21, 9, 9)
    assert cos.min() >= -1 - 1e-6 and cos.max() <= 1 + 1e-6
    full = model(images, out_size=(65, 65))
    assert full.shape == (1, 21, 65, 65)
    (20 * full).logsumexp(1).mean().backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad.abs().sum() > 0


def test_cosine_and_upsampling_match_a_manual_computation():
    torch.manual_seed(1)
    model = build_deeplab("tiny", 4).eval()
    images = torch.rand(2, 3, 40, 48) * 255
    features = model.backbone(images)  # (2,128,5,6)
    w = model.classifier.weight[:, :, 0, 0]
    manual = torch.empty(2, 4, 5, 6)
    for n in range(2):
        for c in range(4):
            for y in range(5):
                for x in range(6):
                    f = features[n, :, y, x]
                    manual[n, c, y, x] = f @ w[c] / (f.norm() * w[c].norm())
    cos = model(images)
    assert torch.allclose(cos, manual, atol=1e-5)
    full = model(images, out_size=(40, 48))
    # align_corners=True maps corner pixels onto corner pixels.
    assert torch.allclose(full[:, :, 0, 0], cos[:, :, 0, 0], atol=1e-6)
    assert torch.allclose(full[:, :, -1, -1], cos[:, :, -1, -1], atol=1e-6)
    assert torch.allclose(full, F.interpolate(cos, size=(40, 48), mode="bilinear", align_corners=True))


class _BNBackbone(nn.Module):
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, images):
        return F.relu(self.bn(self.conv(images / 255)))

    def new_modules(self):
        return []


def _train_step(model):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = model(torch.rand(2, 3, 33, 33) * 255).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_bn_keeps_statistics_across_train(frozen):
    torch.manual_seed(2)
    model = DeepLab(3, _BNBackbone(), frozen_bn=frozen)
    before = {k: v.clone() for k, v in model.backbone.bn.state_dict().items()}
    conv_before = model.backbone.conv.weight.clone()
    _train_step(model)
    after = model.backbone.bn.state_dict()
    keys = ("running_mean", "running_var", "weight", "bias")
    unchanged = all(torch.equal(before[k], after[k]) for k in keys)
    assert unchanged == frozen
    assert model.backbone.bn.training != frozen
    assert not torch.equal(conv_before, model.backbone.conv.weight)


@pytest.mark.slow
def test_frozen_bn_on_resnet101():
    torch.manual_seed(3)
    model = build_deeplab("resnet101", 2, frozen_bn=True)
    bn = model.backbone.body.layer2[0].bn1
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    _train_step(model)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.backbone.head[0].training


def test_freeze_bn_function():
    net = build(ModelSpec("backbone", "resnet101"))
    freeze_bn(net.train())
    assert all(not m.training and not m.weight.requires_grad
               for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.body.conv1.weight.requires_grad
