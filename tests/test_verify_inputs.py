"""verify feeds each model its kind of input: token ids to a model whose input is an embedding, images
otherwise, a given tensor for anything else; every shipped mapping verifies with its defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightport as wp
from weightport.cli import main as cli
from weightport.errors import WeightportError
from weightport.mapping.verify import pairs, verify

_IDENTITY = wp.Mapping([], name="identity")
_LM = wp.Mapping([wp.drop("head.weight")], name="lm")  # tied to embed.weight: one tensor
_LM_FILE = 'name = "lm"\nsource = "conftest:TiedLM"\ntarget = "conftest:TiedLM"\n[[rule]]\ndrop = "head.weight"\n'


def test_a_token_model_gets_token_ids_below_its_vocabulary():
    result = verify(_LM, source="conftest:TiedLM", target="conftest:TiedLM")
    assert result.ok() and result.max_abs_diff == 0
    assert result.input == "token ids below 20, 16 long"
    assert [m.source for m in result.modules] == ["embed", "norm"]  # head.weight is dropped (tied)
    from conftest import TiedLM

    from weightport.mapping._verify_models import make_input

    x, said = make_input(TiedLM(vocab=30), TiedLM(vocab=20), input_size=(5,), batch=3, seed=0)
    assert said == "token ids below 20, 5 long" and x.shape == (3, 5) and int(x.max()) < 20  # the smaller vocabulary


def test_an_image_model_gets_images_and_token_sizes_are_checked():
    result = verify(_IDENTITY, source="conftest:TinyNet", target="conftest:TinyNet", input_size=(3, 8, 8))
    assert result.input == "random images 3x8x8"
    with pytest.raises(WeightportError, match="sequence length"):
        verify(_LM, source="conftest:TiedLM", target="conftest:TiedLM", input_size=(3, 8, 8))


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_input_from_a_file(tmp_path, capsys, suffix):
    from safetensors.torch import save_file

    x = torch.randint(0, 20, (3, 7))
    path = tmp_path / f"ids{suffix}"
    if suffix == ".pt":
        torch.save(x, path)
    elif suffix == ".npy":
        np.save(path, x.numpy())
    else:
        save_file({"input": x}, str(path))
    mapping = tmp_path / "m.toml"
    mapping.write_text(_LM_FILE)
    assert cli(["verify", str(mapping), "--input", str(path), "-v"]) == 0
    assert "input: given input (3, 7) int64" in capsys.readouterr().out


def test_bad_input_files_and_flags_are_refused(tmp_path, capsys):
    mapping = tmp_path / "m.toml"
    mapping.write_text(_LM_FILE)
    assert cli(["verify", str(mapping), "--input", str(tmp_path / "none.pt")]) == 2
    assert "--input" in capsys.readouterr().err
    torch.save({"a": torch.ones(1)}, tmp_path / "dict.pt")
    assert cli(["verify", str(mapping), "--input", str(tmp_path / "dict.pt")]) == 2
    assert "not one tensor" in capsys.readouterr().err
    assert cli(["verify", str(mapping), "--input", str(tmp_path / "dict.pt"), "--input-size", "4"]) == 2
    assert "--input or --input-size" in capsys.readouterr().err


# each shipped mapping's first listed pair, with verify's default input; the few above a second carry `slow`
_SLOW = {
    "hf.bert->weightport.bert",
    "hf.llama->torchtitan.llama",  # importing torchtitan takes about ten seconds
    "hf.qwen3->torchtitan.qwen3",
    "torchvision.vgg->timm.vgg",
    "torchvision.vit->timm.vit",
    "torchvision.swin->timm.swin",
}
_FIRST = [
    pytest.param(name, *pairs(wp.load_mapping(name))[0], marks=pytest.mark.slow if name in _SLOW else ())
    for name in wp.list_mappings()
]


@pytest.mark.parametrize(("name", "source", "target"), _FIRST, ids=lambda v: str(v)[:40])
def test_every_shipped_mapping_verifies_with_its_defaults(name, source, target):
    result = verify(name, source=source, target=target)
    assert result.ok(), result
    assert result.round_trip is True and len(result.modules) > 0


@pytest.mark.slow
def test_the_text_mapping_verifies_as_the_docs_show(capsys):
    assert cli(["verify", "hf.bert->weightport.bert", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "input: token ids below 30522, 16 long" in out
