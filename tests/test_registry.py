"""The model factory builds pretrained models exactly as torchvision's own builders do."""

from __future__ import annotations

import pytest

#: Small architectures whose builders configure the model from the weights in different ways:
#: transform_input and aux heads (googlenet), widths computed with torch (regnet), plain ones.
#: With each, how its published file was made: googlenet's carries the auxiliary heads that the
#: builder drops after loading.
ARCHS = {
    "googlenet": {"aux_logits": True},
    "regnet_y_400mf": {},
    "mobilenet_v3_small": {},
    "squeezenet1_1": {},
    "shufflenet_v2_x0_5": {},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrained_build_matches_torchvision_builder(arch, checkpoint_dir):
    """Same tensors in, same logits out: resnetcli's meta-device build against torchvision's loader."""
    import torch
    from torchvision import models

    from resnetcli.builders import construct as _construct
    from resnetcli.factory import build_model, resolve_weights, weights_file_name

    choice = resolve_weights(arch, "DEFAULT")
    torch.manual_seed(0)
    published = models.get_model_builder(arch)(weights=None, init_weights=False, **ARCHS[arch]) if ARCHS[arch] else None
    state_dict = (published or _construct(arch, choice.pretrained, on_meta=False)).state_dict()
    # torchvision reads an already cached file without a hash check: our tensors under its name.
    checkpoint_dir.mkdir(parents=True)
    torch.save(state_dict, checkpoint_dir / weights_file_name(choice.pretrained))
    reference = models.get_model_builder(arch)(weights=choice.pretrained, progress=False).eval()

    ours = build_model(choice, state_dict=state_dict)
    assert not any(t.is_meta for t in ours.model.state_dict().values())
    batch = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(batch)
        actual = ours.model(batch)
    torch.testing.assert_close(actual, expected)
    assert ours.categories == choice.pretrained.meta["categories"]


def test_checkpoint_fine_tuned_from_pretrained_googlenet_keeps_its_configuration(tmp_path):
    """The transfer-learning recipe on googlenet: pretrained weights (input transform on, aux heads
    dropped by the builder), then `fc` replaced by a 3-class layer. The plain architecture does not
    fit such a checkpoint; resnetcli finds the configuration that does and answers as the model did."""
    import torch
    from torchvision import models

    from resnetcli.factory import load_model

    torch.manual_seed(0)
    fine_tuned = models.GoogLeNet(aux_logits=False, transform_input=True, init_weights=True).eval()
    fine_tuned.fc = torch.nn.Linear(1024, 3)
    checkpoint = tmp_path / "googlenet-finetuned.pth"
    torch.save({"model": fine_tuned.state_dict()}, checkpoint)

    loaded = load_model("googlenet", str(checkpoint))
    assert loaded.categories == ["class_0", "class_1", "class_2"]
    assert loaded.model.transform_input is True
    batch = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), fine_tuned(batch))
