"""Every shipped mapping: schema, names and shapes of every verified variant, numbers on a few.

Names and shapes are checked for every variant a mapping lists (both architectures built on
the meta device, planned with strict=True: every target tensor loaded, every source tensor
used or dropped). Numbers are checked on one or two variants per family: random weights,
port, eval outputs compared, and the bit-identical round trip A -> B -> A.
"""

from __future__ import annotations

import pytest
import tomllib
import torch

import weightport as wp
from weightport.errors import MappingError
from weightport.mapping.files import mapping_files, shipped_dir
from weightport.mapping.verify import map_state_dict, pairs, verify

SHIPPED = sorted(shipped_dir().glob("*.toml"))
VERIFIED = [(wp.load_mapping(p).name, s, t) for p in SHIPPED for s, t in pairs(wp.load_mapping(p))]
# The first variant each mapping lists (its smallest model) is checked in the fast loop; the other variants,
# more than ten seconds together, carry the slow marker and run in the full suite (`make check`).
VARIANTS = [
    pytest.param(m.name, s, t, marks=pytest.mark.slow if i else ())
    for m in map(wp.load_mapping, SHIPPED)
    for i, (s, t) in enumerate(pairs(m))
]

# (mapping, source, target, input size, max abs diff allowed). Tolerances are measured values
# with a margin; an exact zero where both zoos run the same ops in the same order. Families whose
# smallest model costs seconds to run (VGG, DenseNet) are checked by name and shape here and by
# numbers by `weightport verify NAME` (tests/test_verify_inputs.py; measured figures in their descriptions).
NUMERIC = [
    ("torchvision.resnet->timm.resnet", "torchvision:resnet18", "timm:resnet18", (3, 32, 32), 0.0),
    ("torchvision.convnext->timm.convnext", "torchvision:convnext_tiny", "timm:convnext_tiny", (3, 32, 32), 1e-5),
    (
        "torchvision.efficientnet->timm.efficientnet",
        "torchvision:efficientnet_b0",
        "timm:efficientnet_b0",
        (3, 32, 32),
        0.0,
    ),
    (
        "torchvision.mobilenetv3->timm.mobilenetv3",
        "torchvision:mobilenet_v3_large",
        "timm:mobilenetv3_large_100(bn_eps=1e-3)",
        (3, 32, 32),
        1e-5,
    ),
    (
        "torchvision.mobilenetv3_small->timm.mobilenetv3_small",
        "torchvision:mobilenet_v3_small",
        "timm:mobilenetv3_small_100",
        (3, 32, 32),
        1e-3,  # BatchNorm eps 1e-3 (torchvision) vs 1e-5 (timm): measured 2.0e-4
    ),
    (
        "torchvision.swin->timm.swin",
        "torchvision.models.swin_transformer:SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], "
        "num_heads=[1, 2, 4, 8], window_size=[7, 7])",
        "timm:swin_tiny_patch4_window7_224(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))",
        (3, 224, 224),
        1e-5,
    ),
    ("torchvision.regnet->timm.regnet", "torchvision:regnet_y_400mf", "timm:regnety_004", (3, 32, 32), 0.0),
    (
        "torchvision.vit->timm.vit",
        "torchvision.models.vision_transformer:VisionTransformer(image_size=32, patch_size=8, num_layers=2, "
        "num_heads=4, hidden_dim=64, mlp_dim=128)",
        "timm:vit_base_patch16_224(img_size=32, patch_size=8, depth=2, num_heads=4, embed_dim=64, mlp_ratio=2.0)",
        None,
        1e-5,
    ),
    (
        "hf.vit->timm.vit",
        "transformers:ViTForImageClassification(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, "
        "intermediate_size=128, image_size=32, patch_size=8, num_labels=10)",
        "timm:vit_base_patch16_224(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, img_size=32, patch_size=8, "
        "num_classes=10)",
        None,
        2e-4,  # LayerNorm eps 1e-12 (HF) vs 1e-6 (timm)
    ),
    (
        "hf.vit->timm.vit",
        "transformers:ViTModel(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, "
        "image_size=32, patch_size=8)",
        "timm:vit_base_patch16_224(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, img_size=32, patch_size=8, "
        "num_classes=0)",
        None,
        2e-4,
    ),
]


def test_shipped_folder_has_the_mappings_the_issue_names():
    names = set(wp.list_mappings())
    assert {
        "torchvision.resnet->timm.resnet",
        "torchvision.vit->timm.vit",
        "hf.vit->timm.vit",
        "torchvision.convnext->timm.convnext",
        "torchvision.densenet->timm.densenet",
        "torchvision.vgg->timm.vgg",
        "torchvision.efficientnet->timm.efficientnet",
        "torchvision.mobilenetv3->timm.mobilenetv3",
        "torchvision.swin->timm.swin",
        "torchvision.regnet->timm.regnet",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_schema_of_every_shipped_file(path):
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    for field in ("name", "description", "source", "target"):
        assert isinstance(raw.get(field), str) and raw[field].strip(), f"{path.name}: field {field!r} is required"
    mapping = wp.load_mapping(path)  # validates every rule
    assert path.name == mapping.name.replace("->", "-") + ".toml", "file name must be the mapping name"
    assert mapping_files()[mapping.name] == path, "mapping names must be unique"
    assert len(mapping) > 0


@pytest.mark.parametrize(("name", "source", "target"), VARIANTS, ids=lambda v: str(v)[:60])
def test_every_verified_variant_lines_up_by_name_and_shape(name, source, target):
    result = verify(name, source=source, target=target, numerics=False)
    assert result.loaded > 0


@pytest.mark.parametrize(("name", "source", "target", "size", "atol"), NUMERIC, ids=lambda v: str(v)[:50])
def test_ported_outputs_match_and_round_trip_is_bit_identical(name, source, target, size, atol):
    result = verify(name, source=source, target=target, input_size=size)
    assert result.max_abs_diff is not None and result.max_abs_diff <= atol, result
    assert result.round_trip is True


# Mappings whose numbers are checked outside this file: by `weightport verify` with default inputs
# (tests/test_verify_inputs.py: token ids for the text model), and for BERT also against transformers
# (tests/test_bert.py, tests/test_demo.py).
NUMBERS_OUTSIDE_THE_SUITE = {
    "hf.bert->weightport.bert",
    "hf.llama->litgpt.llama",  # against litgpt's converters and transformers' logits: tests/test_llm_litgpt.py
    "hf.llama->torchtitan.llama",  # tests/test_llm_torchtitan.py, against torchtitan's from_hf/to_hf and transformers
    "hf.qwen3->torchtitan.qwen3",
    # against torchtune's converters and transformers' logits: tests/test_llm_torchtune.py, tests/test_llm_meta.py
    "hf.llama->torchtune.llama",
    "hf.qwen2->torchtune.qwen2",
    "hf.llama->meta.llama",
    "meta.llama->torchtune.llama",
    "torchvision.vgg->timm.vgg",
    "torchvision.densenet->timm.densenet",
    "hf.gpt2->nanogpt.gpt2",  # and against nanoGPT's from_pretrained and transformers: tests/test_llm_gpt2.py
    "hf.gpt2->weightport.gpt2",
}


def test_every_mapping_with_a_verified_list_has_a_numeric_check():
    covered = {n for n, *_ in NUMERIC} | NUMBERS_OUTSIDE_THE_SUITE
    assert {name for name, _, _ in VERIFIED} <= covered


def test_map_state_dict_splits_fuses_and_refuses_collisions():
    m = wp.Mapping([wp.fuse(["q.{p}", "k.{p}"], "qk.{p}"), wp.rename("a.{p}", "b.{p}")])
    state = {"q.w": torch.ones(2, 3), "k.w": torch.zeros(2, 3), "a.x": torch.arange(3.0)}
    out = map_state_dict(state, m)
    assert torch.equal(out["qk.w"], torch.cat([state["q.w"], state["k.w"]]))
    back = map_state_dict(out, m.inverse())
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(MappingError, match="part"):
        map_state_dict({"q.w": torch.ones(1)}, m)
    with pytest.raises(MappingError, match="two source tensors"):
        map_state_dict({"a.x": torch.ones(1), "b.x": torch.ones(1)}, m)


def test_a_wrong_mapping_fails_the_parity_check():
    m = wp.load_mapping("torchvision.vit->timm.vit")
    swapped = wp.Mapping(
        [
            wp.rename("encoder.layers.encoder_layer_{i}.ln_1.{p}", "blocks.{i}.norm2.{p}"),
            wp.rename("encoder.layers.encoder_layer_{i}.ln_2.{p}", "blocks.{i}.norm1.{p}"),
            *m.rules,
        ],
        name="swapped",
    )
    _, source, target, _, _ = next(n for n in NUMERIC if n[0] == "torchvision.vit->timm.vit")
    result = verify(swapped, source=source, target=target)
    assert result.max_abs_diff is not None and result.max_abs_diff > 1e-3
