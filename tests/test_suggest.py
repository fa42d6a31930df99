"""`weightport suggest`: mappings proposed from names and shapes, proven by output parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import weightport as wp
from weightport.cli import main as cli
from weightport.mapping.suggest import suggest

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _randomise_buffers(model: nn.Module) -> nn.Module:
    """BatchNorm statistics are identical at init; make them differ so a mispaired buffer shows in outputs."""
    g = torch.Generator().manual_seed(1)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=g) + 0.5 if name.endswith("running_var") else torch.randn(b.shape))
    return model


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2).eval()


def _same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_vit_torchvision_to_timm_is_a_handful_of_general_rules_and_exact():
    src, tgt = _tv_vit(), _timm_vit()
    found = suggest(src, tgt)
    assert not found.unmatched_targets and not found.unmatched_sources
    assert len(found.rules) <= 12  # one rule per kind of tensor, not one per layer
    assert {"rename": "encoder.layers.encoder_layer_{a}.ln_{b}.{p}", "to": "blocks.{a}.norm{b}.{p}"} in found.rules
    report = wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    assert report.coverage == 1.0
    _same_outputs(src, tgt, (2, 3, 32, 32))


def test_file_sources_with_sorted_names_pair_the_same(tmp_path):
    """A safetensors file lists names sorted, so tensor order carries no signal there."""
    src, tgt = _tv_vit(), _timm_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    found = suggest(str(path), tgt)
    assert len(found.rules) <= 12
    wp.transfer(str(path), tgt, mapping=found.mapping(), strict=True)
    _same_outputs(src, tgt, (1, 3, 32, 32))


def test_efficientnet_pairs_every_batchnorm_statistic():
    torch.manual_seed(0)
    src = _randomise_buffers(torchvision.models.efficientnet_b0()).eval()
    tgt = timm.create_model("efficientnet_b0").eval()
    found = suggest(src, tgt)
    wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    _same_outputs(src, tgt, (1, 3, 64, 64))


def test_equal_element_counts_become_reshape_transforms():
    """torchvision ConvNeXt keeps layer scale as (C, 1, 1), timm as (C,)."""
    torch.manual_seed(0)
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, None, 1),
    ]
    src = ConvNeXt(setting).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("layer_scale"):
                p.normal_()
    tgt = timm.create_model("convnext_tiny", dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)).eval()
    found = suggest(src, tgt)
    assert any(r.get("op") == "reshape" and "layer_scale" in r["transform"] for r in found.rules)
    report = wp.transfer(src, tgt, mapping=found.mapping(), strict=True)
    assert len([e for e in report.loaded if e.ops]) == 5  # one layer scale per block, reshaped exactly
    _same_outputs(src, tgt, (1, 3, 64, 64))


class _Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(8, 8) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}) for _ in range(2)
        )


class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(8, 24), "proj": nn.Linear(8, 8)}) for _ in range(2))


def test_siblings_that_concatenate_become_fuse_and_split_rules():
    sep, fused = _Separate(), _Fused()
    forward = suggest(sep, fused)
    assert {
        "fuse": ["layers.{a}.q_proj.{p}", "layers.{a}.k_proj.{p}", "layers.{a}.v_proj.{p}"],
        "to": "blocks.{a}.qkv.{p}",
    } in forward.rules
    wp.transfer(sep, fused, mapping=forward.mapping(), strict=True)
    for i in range(2):
        parts = [sep.layers[i][n].weight for n in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(fused.blocks[i]["qkv"].weight, torch.cat(parts))
        assert torch.equal(fused.blocks[i]["proj"].weight, sep.layers[i]["o_proj"].weight)

    back = suggest(fused, _Separate())
    assert any("split" in r for r in back.rules)
    again = _Separate()
    wp.transfer(fused, again, mapping=back.mapping(), strict=True)
    for a, b in zip(again.state_dict().values(), sep.state_dict().values()):
        assert torch.equal(a, b)


def test_what_cannot_be_paired_is_listed_not_guessed():
    src = {"body.weight": (4, 4), "extra.weight": (7,)}
    tgt = {"trunk.weight": (4, 4), "new_head.weight": (3, 4)}
    found = suggest(src, tgt)
    assert found.pairs == {"trunk.weight": ("body.weight",)}
    assert found.unmatched_targets == ["new_head.weight"]
    assert found.unmatched_sources == ["extra.weight"]
    text = found.to_toml(name="mine")
    assert "#   new_head.weight" in text and "#   extra.weight" in text


def test_suggested_rules_send_every_paired_key_where_the_pairing_says():
    """General rules that would catch a key meant elsewhere get a literal rule in front."""
    src = {f"enc.{i}.w": (4,) for i in range(3)} | {"enc.9.w": (5,)}
    tgt = {f"dec.{i}.w": (4,) for i in range(3)} | {"other.w": (5,)}
    found = suggest(src, tgt)
    mapping = found.mapping()
    for t, (s,) in found.pairs.items():
        assert [o.target for o in mapping.resolve(s).outputs] == [t]


def test_cli_writes_a_mapping_file_that_ports(tmp_path, capsys):
    src = _tv_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    target = (
        "timm.models.vision_transformer:VisionTransformer"
        "(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2)"
    )
    out = tmp_path / "mine.toml"
    assert cli(["suggest", str(path), target, "-o", str(out), "--name", "tv->timm"]) == 0
    err = capsys.readouterr().err
    assert "coverage 100.00%" in err
    mapping = wp.load_mapping(out)
    assert mapping.name == "tv->timm" and mapping.target == target
    assert cli(["port", str(path), target, "--mapping", str(out), "--strict", "--dry-run"]) == 0


def test_cli_prints_the_mapping_without_out(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"body.weight": torch.zeros(4, 4)}, str(path))
    assert cli(["suggest", str(path), "torch.nn:Linear(4, 4)"]) == 0
    out = capsys.readouterr().out
    assert 'rename = "body.weight"' in out and 'to = "weight"' in out


def test_cli_bad_target_is_exit_2(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    assert cli(["suggest", str(path), "no.such.module:Thing"]) == 2
    assert "no.such.module" in capsys.readouterr().err


def test_cli_records_a_weights_file_as_source_file_not_as_source(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"body.weight": torch.zeros(4, 4), "body.bias": torch.zeros(4)}, str(path))
    out = tmp_path / "m.toml"
    assert cli(["suggest", str(path), "torch.nn:Linear(4, 4)", "-o", str(out), "-q"]) == 0
    mapping = wp.load_mapping(out)
    assert mapping.source_file == str(path) and mapping.source is None
    assert mapping.target == "torch.nn:Linear(4, 4)"


def test_cli_records_an_architecture_spec_as_source(tmp_path, monkeypatch):
    import weightport.sources

    real = weightport.sources.open_source
    monkeypatch.setattr(
        weightport.sources, "open_source", lambda spec, **kw: real({"body.weight": torch.zeros(4, 4)}, **kw)
    )
    out = tmp_path / "m.toml"
    assert cli(["suggest", "torchvision:tiny_thing", "torch.nn:Linear(4, 4, bias=False)", "-o", str(out), "-q"]) == 0
    mapping = wp.load_mapping(out)
    assert mapping.source == "torchvision:tiny_thing" and mapping.source_file is None


# -- pairing modules, not tensors ---------------------------------------------------------------------


def _bn(prefix: str, c: int, counter: bool = True) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.{leaf}": (c,) for leaf in ("weight", "bias", "running_mean", "running_var")}
    return out | ({f"{prefix}.num_batches_tracked": ()} if counter else {})


def test_scalar_buffers_never_pair_across_modules():
    src = _bn("features.0", 4, counter=False) | _bn("features.1", 8)
    tgt = _bn("bn_a", 4) | _bn("bn_b", 8)
    found = suggest(src, tgt)
    assert found.pairs["bn_b.num_batches_tracked"] == ("features.1.num_batches_tracked",)
    assert "bn_a.num_batches_tracked" in found.unmatched_targets
    assert found.pairs["bn_a.running_var"] == ("features.0.running_var",)


def test_a_modules_weight_and_bias_move_together():
    """Per tensor, a conv bias looks like a norm's weight or bias; per module it cannot."""
    src = {"m.x.bias": (4,), "m.x.weight": (4,), "m.y.bias": (4,), "m.y.weight": (4, 4)}  # sorted, as in a file
    tgt = {"conv.weight": (4, 4), "conv.bias": (4,), "norm.weight": (4,), "norm.bias": (4,)}
    found = suggest(src, tgt)
    assert found.pairs["conv.bias"] == ("m.y.bias",)
    assert found.pairs["norm.weight"] == ("m.x.weight",) and found.pairs["norm.bias"] == ("m.x.bias",)


def test_a_sorted_source_is_aligned_by_its_layer_indices():
    """A file lists ``layer10`` before ``layer2``; here the indices differ by one on the two sides, so only
    the order (restored by the indices) can tell which layer is which."""
    unit = {"conv.weight": (8, 8, 3, 3), "conv.bias": (8,), "norm.weight": (8,), "norm.bias": (8,)}
    src = dict(sorted({f"layer{i}.{k}": s for i in range(12) for k, s in unit.items()}.items()))
    tgt = {f"b{i + 1}.{k}": s for i in range(12) for k, s in unit.items()}
    found = suggest(src, tgt)
    for i in range(12):
        assert found.pairs[f"b{i + 1}.conv.weight"] == (f"layer{i}.conv.weight",)
        assert found.pairs[f"b{i + 1}.norm.bias"] == (f"layer{i}.norm.bias",)


def _hf_llama_names(layers: int, sort: bool) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (100, 16)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {f"{p}.self_attn.{n}_proj.weight": (16, 16) for n in "qkvo"}
        out |= {f"{p}.mlp.gate_proj.weight": (24, 16), f"{p}.mlp.up_proj.weight": (24, 16)}
        out |= {f"{p}.mlp.down_proj.weight": (16, 24)}
        out |= {f"{p}.input_layernorm.weight": (16,), f"{p}.post_attention_layernorm.weight": (16,)}
    out |= {"model.norm.weight": (16,), "lm_head.weight": (100, 16)}
    return dict(sorted(out.items())) if sort else out


def _meta_llama_names(layers: int) -> dict[str, tuple[int, ...]]:
    out = {"tok_embeddings.weight": (100, 16)}
    for i in range(layers):
        out |= {f"layers.{i}.attention_norm.weight": (16,), f"layers.{i}.attention.wqkv.weight": (48, 16)}
        out |= {f"layers.{i}.attention.wo.weight": (16, 16), f"layers.{i}.ffn_norm.weight": (16,)}
        out |= {f"layers.{i}.feed_forward.{w}.weight": s for w, s in (("w1", (24, 16)), ("w2", (16, 24)))}
        out |= {f"layers.{i}.feed_forward.w3.weight": (24, 16)}
    return out | {"norm.weight": (16,), "output.weight": (100, 16)}


@pytest.mark.parametrize("sort", [False, True], ids=["module-order", "sorted"])
def test_a_shared_word_does_not_outweigh_the_modules_place(sort):
    """``post_attention_layernorm`` shares "attention" with ``attention_norm``, but sits where ``ffn_norm``
    does: after the attention."""
    found = suggest(_hf_llama_names(2, sort), _meta_llama_names(2))
    assert not found.unmatched_targets and not found.unmatched_sources
    for i in range(2):
        assert found.pairs[f"layers.{i}.ffn_norm.weight"] == (f"model.layers.{i}.post_attention_layernorm.weight",)
        assert found.pairs[f"layers.{i}.attention_norm.weight"] == (f"model.layers.{i}.input_layernorm.weight",)
        assert found.pairs[f"layers.{i}.feed_forward.w2.weight"] == (f"model.layers.{i}.mlp.down_proj.weight",)
        assert len(found.pairs[f"layers.{i}.attention.wqkv.weight"]) == 3


def test_suggest_never_raises_on_pairs_it_cannot_compress(tmp_path):
    """GPT-2 (Conv1D, transposed) to BERT: little pairs, and general rules would clash; it lists the rest."""
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    )
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
    )
    path = tmp_path / "gpt2.safetensors"
    wp.save(gpt2, str(path))
    found = suggest(str(path), bert)
    mapping = found.mapping()
    for t, sources in found.pairs.items():
        for s in sources:  # a split source feeds several targets, this one among them
            assert t in [o.target for o in mapping.resolve(s).outputs]
    assert found.unmatched_targets and found.unmatched_sources
    assert len(found.pairs) + len(found.unmatched_targets) == len(bert.state_dict())


def test_a_projection_shortcut_pairs_with_downsample_whatever_the_order():
    """torchvision RegNet declares its shortcut ``proj`` first, timm its ``downsample`` last, with the same
    shapes as the first convolution: the name decides, and the norms follow their convolutions."""
    src = torchvision.models.regnet_y_400mf(num_classes=10)
    tgt = timm.create_model("regnety_004", num_classes=10, pretrained=False)
    found = suggest(src, tgt)
    assert not found.unmatched_targets
    for stage in range(1, 5):
        tv = f"trunk_output.block{stage}.block{stage}-0"
        for kind, tv_kind in (("conv", "0"), ("bn", "1")):
            for leaf in ("weight",) if kind == "conv" else ("weight", "bias", "running_mean", "running_var"):
                assert found.pairs[f"s{stage}.b1.downsample.{kind}.{leaf}"] == (f"{tv}.proj.{tv_kind}.{leaf}",)
                assert found.pairs[f"s{stage}.b1.conv1.{kind}.{leaf}"] == (f"{tv}.f.a.{tv_kind}.{leaf}",)
                assert found.pairs[f"s{stage}.b1.conv3.{kind}.{leaf}"] == (f"{tv}.f.c.{tv_kind}.{leaf}",)
