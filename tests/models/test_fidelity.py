"""Training-mode details where `ann` follows the peers exactly: BN momentum of the shared projection,
and the order in which the aux head and the decode head draw their dropout masks."""

import copy

import pytest
import torch

from anncli.models.ann import build_model
from anncli.models.segmentor import upsample_to
from anncli.models.attention import APNB
from anncli.recipe import ModelConfig


def test_shared_key_query_bn_takes_the_two_steps_the_peers_take():
    torch.manual_seed(0)
    block = APNB(16, 16, 8, 8, dropout=0.0, sizes=(1, 2)).train()
    bn = block.attention.f_key[1]
    peer_bn = copy.deepcopy(bn)
    peer_bn.momentum = 0.1
    x = torch.randn(2, 16, 6, 7)
    pre = block.attention.f_key[0](x).detach()
    block(x)
    peer_bn(pre)  # the peers call the shared module twice: once for the query, once for the key
    peer_bn(pre)
    assert torch.allclose(bn.running_mean, peer_bn.running_mean, atol=1e-7)
    assert torch.allclose(bn.running_var, peer_bn.running_var, atol=1e-6)


def _reference_step(model, x, aux_first: bool):
    """The forward written out in the peer's order."""
    size = x.shape[-2:]
    *_, c3, c4 = model.backbone(x)
    if aux_first:
        aux = model.aux_head(c3)
    y = model.apnb(model.context(model.afnb(c3, c4)))
    main = model.classifier(y)
    if not aux_first:
        aux = model.aux_head(c3)
    ac = model.align_corners
    return upsample_to(main, size, ac), upsample_to(aux, size, ac)


@pytest.mark.parametrize("variant, backbone, aux_first", [("official", "small", True), ("mmseg", "resnet50", False)])
def test_dropout_masks_are_drawn_in_the_peers_order(variant, backbone, aux_first):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, backbone=backbone, num_classes=3, key_channels=8, value_channels=8,
                      dropout=0.5)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 33, 41)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    main, aux = model(x)
    model.load_state_dict(state)
    torch.manual_seed(7)
    ref_main, ref_aux = _reference_step(model, x, aux_first)
    assert torch.equal(main, ref_main) and torch.equal(aux, ref_aux)
    torch.manual_seed(7)  # and the other order really draws other masks
    other_main, _ = _reference_step(model, x, not aux_first)
    assert not torch.equal(main, other_main)
