"""The ANN network: exact parameter counts, shapes, attention equivalences, weights loading, summary CLI."""

import json

import pytest
import torch
from conftest import run_ann
from torch import nn

from anncli.errors import UserError
from anncli.models.ann import build_model
from anncli.models.anchors import AnchorSampler
from anncli.models.attention import AFNB, APNB, AttentionBranch, NonLocalBlock, attend
from anncli.models.resnet import load_backbone_weights, small_basic_resnet
from anncli.recipe import ModelConfig

torch.set_num_threads(1)
SMALL = dict(backbone="small", num_classes=5, key_channels=32, value_channels=64)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(**kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(**kw))


def test_parameter_counts_match_the_official_network():
    model = meta_model(name="ann", backbone="resnet101", num_classes=19, aux=True)
    assert n_params(model) == 67_694_310
    assert n_params(model.backbone) == 42_623_936
    assert n_params(model.afnb) == 9_971_456
    assert n_params(model.context) == 9_438_720
    assert n_params(model.apnb) == 920_576
    assert n_params(model.classifier) == 513 * 19
    assert n_params(model.aux_head) == 4_720_128 + 513 * 19
    assert n_params(meta_model(num_classes=150)) == 67_828_716  # ADE20K
    assert n_params(meta_model(num_classes=59)) == 67_735_350  # PASCAL Context


def test_baselines_share_the_backbone_and_the_small_demo_sizes():
    ann = meta_model(**SMALL)
    nonlocal_ = meta_model(name="nonlocal", **SMALL)
    fcn = meta_model(name="fcn", **SMALL)
    assert n_params(nonlocal_) == n_params(ann)  # anchor pooling has no parameters
    assert nonlocal_.apnb.attention.sampler is None and nonlocal_.afnb.attention.sampler is None
    assert fcn.afnb is None and fcn.apnb is None
    assert n_params(fcn.backbone) == n_params(ann.backbone)
    # demo prototype: FCN 1.60 M, ANN 1.83 M parameters
    assert round(n_params(fcn) / 1e6, 2) == 1.60 and round(n_params(ann) / 1e6, 2) == 1.83
    assert not meta_model(aux=False, **SMALL).aux and meta_model(**SMALL).aux


@pytest.mark.parametrize("size,stride8,stride16", [((769, 769), (97, 97), (49, 49)), ((512, 1024), (65, 129), (33, 65))])
def test_feature_and_output_shapes(size, stride8, stride16):
    for os_, feat in ((8, stride8), (16, stride16)):
        model = meta_model(output_stride=os_)
        x = torch.empty(1, 3, *size, device="meta")
        c1, c2, c3, c4 = model.backbone(x)
        assert tuple(c3.shape) == (1, 1024, *feat) and tuple(c4.shape) == (1, 2048, *feat)
        main, aux = model.train()(x)
        assert tuple(main.shape) == tuple(aux.shape) == (1, 19, *size)
        assert tuple(model.eval()(x).shape) == (1, 19, *size)


def test_anchor_sampler_counts_110_anchors_and_supports_max_pooling():
    x = torch.randn(2, 4, 16, 12)
    for mode in ("avg", "max"):
        out = AnchorSampler((1, 3, 6, 8), mode)(x)
        assert out.shape == (2, 4, 110)
    assert torch.allclose(AnchorSampler((1,), "avg")(x)[..., 0], x.mean((2, 3)), atol=1e-6)
    assert torch.equal(AnchorSampler((1,), "max")(x)[..., 0], x.amax((2, 3)))


def _randomize_output_conv(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, AttentionBranch):
            nn.init.normal_(m.W.weight, std=0.1)
            nn.init.normal_(m.W.bias, std=0.1)


def test_apnb_with_identity_sampling_equals_the_non_local_block():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    apnb_branch = AttentionBranch(16, 8, 12, 16, sizes=(8,)).eval()  # an 8x8 grid on an 8x8 map: every pixel
    _randomize_output_conv(apnb_branch)
    nl = NonLocalBlock(16, 16, 8, 12).eval()
    nl.load_state_dict(apnb_branch.state_dict())
    with torch.no_grad():
        assert torch.allclose(apnb_branch(x), nl(x), atol=1e-6, rtol=1e-5)
        assert apnb_branch(x).abs().max() > 1e-3  # the comparison is not between zeros

    full = APNB(16, 16, 8, 12, sizes=(8,)).eval()
    _randomize_output_conv(full)
    plain = APNB(16, 16, 8, 12, sizes=None).eval()
    plain.load_state_dict(full.state_dict())
    with torch.no_grad():
        assert torch.allclose(full(x), plain(x), atol=1e-6, rtol=1e-5)


def test_attention_matches_an_explicit_per_position_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 4), torch.randn(1, 3, 4), torch.randn(1, 2, 3)  # v channels first
    out = attend(q, k, v)
    assert out.shape == (1, 2, 5)
    for i in range(5):
        weights = torch.softmax(torch.stack([(q[0, i] * k[0, j]).sum() / 2.0 for j in range(3)]), 0)
        assert torch.allclose(out[0, :, i], (weights[None, :] * v[0]).sum(1), atol=1e-6)


def test_attention_similarity_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 32).bfloat16() * 8 for _ in range(3))
    v = v.transpose(1, 2).contiguous()  # (B, Cv, S)
    reference = attend(q.float(), k.float(), v.float()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference)


def test_zero_initialised_output_conv_makes_attention_contribute_nothing():
    torch.manual_seed(0)
    low, high = torch.randn(2, 8, 6, 10), torch.randn(2, 16, 6, 10)
    afnb, apnb = AFNB(8, 16, 16, 4, 6).eval(), APNB(16, 16, 4, 6).eval()
    with torch.no_grad():
        assert torch.count_nonzero(afnb.attention(high, low)) == 0
        assert torch.count_nonzero(apnb.attention(high)) == 0
        assert torch.equal(afnb(low, high), afnb.fuse(torch.cat([torch.zeros_like(high), high], 1)))
        assert torch.equal(apnb(high), apnb.fuse(torch.cat([torch.zeros_like(high), high], 1)))


def test_eval_is_deterministic_and_train_returns_main_and_aux():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL))
    x = torch.randn(2, 3, 32, 48)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (2, 5, 32, 48) and torch.equal(a, b)
    model.train()
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 5, 32, 48)
    no_aux = build_model(ModelConfig(aux=False, **SMALL)).train()
    main, aux = no_aux(x)
    assert aux is None and main.shape == (2, 5, 32, 48)


@pytest.mark.parametrize("name", ["ann", "fcn", "nonlocal"])
def test_small_model_trains_a_few_steps(name):
    from anncli.train.losses import SegLoss
    from anncli.recipe import LossConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **SMALL)).train()
    criterion = SegLoss(LossConfig(ohem_min_kept=64), 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    y[:, :2] = 255
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        total, parts = criterion(*model(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
        assert torch.isfinite(total) and parts["aux_loss"] > 0
    if name != "fcn":  # the zero-initialised W receives a gradient and moves
        assert not torch.equal(before["apnb.attention.W.weight"], model.state_dict()["apnb.attention.W.weight"])
    assert not torch.equal(before["classifier.weight"], model.state_dict()["classifier.weight"])


def test_backbone_weights_load_from_official_and_torchvision_style_files(tmp_path):
    torch.manual_seed(1)
    source = small_basic_resnet()
    official = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}  # prefix.* keys, wrapped
    torch.save({"state_dict": official}, tmp_path / "official.pth")
    plain = {k.removeprefix("prefix."): v for k, v in source.state_dict().items()}  # conv1.*, layer1.* like torchvision
    plain["fc.weight"], plain["fc.bias"] = torch.zeros(10, 256), torch.zeros(10)
    torch.save(plain, tmp_path / "plain.pth")
    for name in ("official.pth", "plain.pth"):
        target = small_basic_resnet()
        load_backbone_weights(target, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    model = build_model(ModelConfig(pretrained=str(tmp_path / "plain.pth"), **SMALL))
    assert torch.equal(model.backbone.prefix.conv1.weight, source.prefix.conv1.weight)


def test_a_7x7_stem_checkpoint_is_rejected_with_the_keys_named(tmp_path):
    state = {k.removeprefix("prefix."): v for k, v in small_basic_resnet().state_dict().items()
             if not k.startswith(("prefix.conv2", "prefix.bn2", "prefix.conv3", "prefix.bn3"))}
    state["conv1.weight"] = torch.zeros(16, 3, 7, 7)
    torch.save(state, tmp_path / "tv.pth")
    with pytest.raises(UserError) as err:
        build_model(ModelConfig(pretrained=str(tmp_path / "tv.pth"), **SMALL))
    message = str(err.value)
    assert "\n" not in message
    assert "missing: prefix.conv2.weight" in message and "prefix.conv1.weight [16, 3, 7, 7] vs [16, 3, 3, 3]" in message
    with pytest.raises(UserError, match="not found"):
        build_model(ModelConfig(pretrained=str(tmp_path / "none.pth"), **SMALL))


def test_model_summary_json_through_the_cli():
    res = run_ann("model", "summary", "--model", "ann", "--backbone", "resnet101", "--classes", "19", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["params"] == 67_694_310 and out["flops"] is None
    assert out["modules"] == {"backbone": 42_623_936, "afnb": 9_971_456, "context": 9_438_720, "apnb": 920_576,
                              "classifier": 9_747, "aux": 4_729_875}


def test_model_summary_counts_flops_per_module_and_rejects_bad_input(capsys):
    from anncli.interop.summary import print_summary

    out = print_summary("fcn", "small", 5, "64x128", aux=False, as_json=True)
    assert json.loads(capsys.readouterr().out) == out
    assert "aux" not in out["modules"] and out["params"] == sum(out["modules"].values())
    # the FCN's 3x3 context conv alone: 2 * 256*9 * 128 * (8*16) multiply-adds at stride 8
    assert out["flops"] > 2 * 256 * 9 * 128 * 8 * 16
    with pytest.raises(UserError, match="--input"):
        print_summary("ann", "small", 5, "769by769", aux=True, as_json=True)
    with pytest.raises(UserError, match="--model"):
        print_summary("annx", "small", 5, None, aux=True, as_json=True)
