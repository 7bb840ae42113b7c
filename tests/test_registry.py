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

    from resnetcli.registry import _construct, build_model, resolve_weights, weights_file_name

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
