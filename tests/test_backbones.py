import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from defectlens.backbones import available_backbones, build_extractor, get_spec
from defectlens.backbones.resnet import BasicBlock, TappedResNet
from defectlens.errors import WeightsError, command_line_messages


def test_efficientnet_lite0_weights_classify_the_cat():
    """The packaged ImageNet weights are really loaded: chelsea() is a cat (classes 281-285)."""
    extractor = build_extractor("efficientnet_lite0", [16], image_size=224)
    image = np.array(Image.fromarray(skimage.data.chelsea()).resize((224, 224)))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = (x - extractor.mean) / extractor.std  # [-1, 1], the lite models' input range
    with torch.no_grad():
        logits = extractor.net.model(x)
    top5 = set(logits.topk(5).indices[0].tolist())
    assert top5 & {281, 282, 283, 284, 285}
    assert logits.argmax().item() in range(281, 286)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_taps_have_registered_strides_and_channels(name):
    extractor = build_extractor(name, [4, 8, 16, 32], image_size=64)
    outs = extractor(torch.rand(2, 3, 64, 64))
    spec = get_spec(name)
    for stride, out in zip((4, 8, 16, 32), outs, strict=True):
        assert out.shape == (2, spec.taps[stride], 64 // stride, 64 // stride)


def test_fast_path_without_a_backend_is_eager_torch_without_autograd():
    extractor = build_extractor("efficientnet_lite0", [4, 16], image_size=64)
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    eager = extractor(x)
    fast = extractor.fast(x)
    assert eager[0].requires_grad and not fast[0].requires_grad
    for a, b in zip(eager, fast, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-4, atol=1e-4)


def test_extractor_stays_frozen_in_train_mode():
    extractor = build_extractor("efficientnet_lite0", [8], image_size=64)
    extractor.train()
    assert not extractor.net.training
    assert not any(p.requires_grad for p in extractor.parameters())


def test_resnet_requires_weights_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"or pass weights=PATH\)$") as info:
        build_extractor("resnet18", [4, 8], image_size=64)
    assert (
        info.value.reason.startswith("no weights for resnet18") and "pass" not in info.value.reason
    )
    with command_line_messages(), pytest.raises(WeightsError, match=r"pass --weights PATH\)$"):
        build_extractor("resnet18", [4, 8], image_size=64)
    status = {s.name: s.weights_status() for s in available_backbones()}
    assert status["resnet18"].startswith("missing")
    assert status["efficientnet_lite0"].startswith("available")


def test_resnet_loads_torchvision_style_file_strictly(tmp_path, monkeypatch):
    net = TappedResNet(BasicBlock, (2, 2, 2, 2))
    path = tmp_path / "resnet18-test.pth"
    torch.save(net.state_dict(), path)
    extractor = build_extractor("resnet18", [4, 8, 16], image_size=64, weights=str(path))
    shapes = [tuple(o.shape) for o in extractor(torch.rand(1, 3, 64, 64))]
    assert shapes == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
    # Found in the torch hub cache without --weights.
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(net.state_dict(), hub / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert build_extractor("resnet18", [8], image_size=64).weights_path.parent == hub


def test_resnet_rejects_mismatched_or_corrupt_weights(tmp_path):
    state = TappedResNet(BasicBlock, (2, 2, 2, 2)).state_dict()
    del state["fc.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="does not match") as caught:
        build_extractor("resnet18", [8], image_size=64, weights=str(bad))
    assert "1 missing (e.g. fc.weight)" in str(caught.value)
    n_needed = len(TappedResNet(BasicBlock, (2, 2, 2, 2)).state_dict())  # not the file's count
    assert f"of the {n_needed} tensors resnet18 needs" in str(caught.value)
    # an efficientnet file for a resnet: a short line naming a few keys, not hundreds
    lite = build_extractor("efficientnet_lite0", [8], image_size=64).weights_state()
    other = tmp_path / "other.pth"
    torch.save(lite, other)
    with pytest.raises(WeightsError, match="does not match") as caught:
        build_extractor("resnet18", [8], image_size=64, weights=str(other))
    assert len(str(caught.value)) < 600 and "weights file for resnet18" in str(caught.value)
    same_names = {k: v[..., :1] if v.ndim == 4 else v for k, v in state.items()}
    torch.save({**same_names, "fc.weight": torch.zeros(1000, 512)}, bad)
    with pytest.raises(WeightsError, match=r"does not match.*size mismatch"):
        build_extractor("resnet18", [8], image_size=64, weights=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        build_extractor("resnet18", [8], image_size=64, weights=str(junk))


def test_unknown_backbone_and_tap():
    with pytest.raises(WeightsError, match="unknown backbone"):
        get_spec("vgg16")
    with pytest.raises(WeightsError, match="no feature tap"):
        build_extractor("efficientnet_lite0", [2], image_size=64)
