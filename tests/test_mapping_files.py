"""Mapping files: loading, extends, and validation errors that name file, rule and field."""

from __future__ import annotations

import textwrap

import pytest

import weightport as wp
from weightport.errors import MappingError
from weightport.mapping.files import parse_mapping

GOOD = """
name = "a->b"
description = "test mapping"
source = "x"
target = "y"
verified = ["x1", "x2"]

[[rule]]
rename = "encoder.layer_{i}.{p}"
to = "blocks.{i}.{p}"

[[rule]]
drop = "heads.pre_logits.**"

[[rule]]
split = "qkv.{p}"
to = ["q.{p}", "k.{p}", "v.{p}"]
sizes = [4, 2, 2]

[[rule]]
fuse = ["a.{i}.x", "a.{i}.y"]
to = "b.{i}.xy"
dim = 1

[[rule]]
transform = "head.weight"
to = "fc.weight"
op = "select"
index = [0, 5, 9]

[[rule]]
transform = "stem.weight"
to = "conv1.weight"
op = "in_channels"
params = { map = [2, 1, 0] }

[[rule]]
strip_prefix = "module."
"""


def _write(tmp_path, text: str, name: str = "m.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_file_loads_every_rule_kind(tmp_path):
    m = wp.load_mapping(_write(tmp_path, GOOD))
    assert (m.name, m.description, m.source, m.target, m.verified) == ("a->b", "test mapping", "x", "y", ("x1", "x2"))
    assert len(m) == 7
    assert m.resolve("encoder.layer_3.weight").outputs[0].target == "blocks.3.weight"
    assert m.resolve("heads.pre_logits.fc.weight").dropped
    assert [o.ops[0].params["sizes"] for o in m.resolve("qkv.weight").outputs] == [[4, 2, 2]] * 3
    assert m.resolve("a.2.y").outputs[0].part == (1, 2) and m.resolve("a.2.y").outputs[0].dim == 1
    assert m.resolve("head.weight").outputs[0].ops[0].label() == "select[3 along 0]"
    assert m.resolve("stem.weight").outputs[0].ops[0].params == {"map": [2, 1, 0]}
    assert m.resolve("module.x").outputs[0].target == "x"
    assert "rule 1" in m.rules[0].described() and str(tmp_path) in m.rules[0].described()


def test_extends_appends_the_base_rules_and_detects_cycles(tmp_path):
    base = _write(tmp_path, 'name = "base"\n[[rule]]\nrename = "x.{p}"\nto = "y.{p}"\n', "base.toml")
    child = _write(tmp_path, f'extends = "{base}"\n[[rule]]\nrename = "x.w"\nto = "z.w"\n', "child.toml")
    m = wp.load_mapping(child)
    assert m.resolve("x.w").outputs[0].target == "z.w"  # ours first
    assert m.resolve("x.b").outputs[0].target == "y.b"
    cyc = tmp_path / "cyc.toml"
    cyc.write_text(f'extends = "{cyc}"\n')
    with pytest.raises(MappingError, match="cycle"):
        wp.load_mapping(cyc)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ('nmae = "x"', r"m\.toml", r"unknown field\(s\) 'nmae'"),
        (
            '[[rule]]\nrename = "a.{i}"\nto = "b.{i}"\nfoo = 1',
            r"m\.toml rule 1 \(rename\)",
            r"unknown field\(s\) 'foo'",
        ),
        ('[[rule]]\nrename = "a.{i}"\nto = "b.{j}"', r"rule 1 \(rename\): field 'to'", r"\{j\}.*does not capture"),
        ('[[rule]]\nrename = "a.{i}.{j}"\nto = "b.{i}"', r"rule 1 \(rename\): field 'to'", r"\{j\}.*not used"),
        ('[[rule]]\nrename = "a.{i"\nto = "b"', r"rule 1 \(rename\): field 'rename'", "never closed"),
        ('[[rule]]\nrename = "a"\nto = "b.*"', r"rule 1 \(rename\): field 'to'", "cannot contain"),
        ('[[rule]]\ntransform = "a"\nto = "b"\nop = "nope"', r"rule 1 \(transform\): field 'op'", "unknown op 'nope'"),
        ('[[rule]]\ntransform = "a"\nto = "b"\nop = "scale"', r"rule 1 \(transform\)", "needs parameter.*'factor'"),
        ('[[rule]]\ntransform = "a"\nto = "b"\nop = "scale"\nfactr = 2', r"rule 1 \(transform\)", "'factr'"),
        ('[[rule]]\ntransform = "a"\nto = "b"\nop = "scale"\nparams = 3', r"rule 1 \(transform\)", "'params'"),
        ('[[rule]]\nsplit = "a.{p}"\nto = ["b.{p}"]', r"rule 1 \(split\)", "at least two"),
        ('[[rule]]\nsplit = "a.{p}"\nto = ["b.{p}", "c.{p}"]\ndim = "0"', r"rule 1 \(split\)", "field 'dim'"),
        ('[[rule]]\nsplit = "a.{p}"\nto = ["b.{p}", "c.{p}"]\nsizes = [1]', r"rule 1 \(split\)", "sizes"),
        ('[[rule]]\nrename = "a"\n', r"rule 1 \(rename\)", "field 'to' is required"),
        ('[[rule]]\nrename = "a"\ndrop = "b"', r"rule 1", "exactly one of"),
        ('[[rule]]\nrename = 5\nto = "b"', r"rule 1 \(rename\)", "field 'rename'"),
        (
            '[[rule]]\nrename = "a.{i}"\nto = "x.{i}"\n[[rule]]\nrename = "b.{j}"\nto = "x.{j}"',
            r"m\.toml",
            "rules 1 and 2 both write 'x.{j}'",
        ),
        ("rule = 3", r"m\.toml", "array of tables"),
        ('verified = "x"', r"m\.toml", "field 'verified'"),
        ("name = 3", r"m\.toml", "field 'name'"),
        ("name = [", r"m\.toml", "not valid TOML"),
    ],
)
def test_invalid_files_name_file_rule_and_field(tmp_path, text, where, message):
    path = _write(tmp_path, text)
    with pytest.raises(MappingError, match=where) as info:
        wp.load_mapping(path)
    assert info.match(message)
    assert str(path) in str(info.value)


def test_rules_that_differ_only_by_an_index_offset_may_write_one_list(tmp_path):
    text = (
        '[[rule]]\nrename = "layer1.{i}.w"\nto = "blocks.{i}.w"\n'
        '[[rule]]\nrename = "layer2.{i}.w"\nto = "blocks.{i+3}.w"'
    )
    m = wp.load_mapping(_write(tmp_path, text))
    assert m.resolve("layer2.0.w").outputs[0].target == "blocks.3.w"


def test_unknown_names_and_non_utf8_files_are_mapping_errors(tmp_path):
    with pytest.raises(MappingError, match="neither a mapping file nor a shipped mapping"):
        wp.load_mapping("no-such-mapping")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"name = '\xff\xfe'")
    with pytest.raises(MappingError, match="bad.toml"):
        wp.load_mapping(bad)
    with pytest.raises(MappingError, match="TOML table"):
        parse_mapping([1, 2])


def test_a_mapping_file_records_the_weights_file_and_its_tolerance():
    m = parse_mapping({"name": "s", "source_file": "w.safetensors", "atol": 1e-3, "rule": []})
    assert (m.source_file, m.atol) == ("w.safetensors", 1e-3) and m.describe()["atol"] == 1e-3
    for bad in (-1, "1e-3", True):
        with pytest.raises(MappingError, match="'atol' must be a non-negative number"):
            parse_mapping({"atol": bad})
