"""Property tests: random mapping files and keys raise only WeightportError; inverses give names back."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightport as wp
from weightport.errors import WeightportError
from weightport.mapping.files import parse_mapping

segment = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
piece = st.sampled_from(["a", "b", ".", "{i}", "{p}", "{r*}", "*", "**", "{i+1}", "{", "}", "re:a.", "1", "_"])
text = st.lists(piece, min_size=0, max_size=6).map("".join)
scalar = st.one_of(st.integers(-3, 5), st.booleans(), text, st.floats(allow_nan=True), st.none())
value = st.one_of(scalar, st.lists(st.one_of(st.integers(-2, 4), text), max_size=4))
rule_keys = st.sampled_from(
    [
        "rename",
        "drop",
        "split",
        "fuse",
        "transform",
        "strip_prefix",
        "add_prefix",
        "to",
        "dim",
        "sizes",
        "op",
        "params",
        "index",
        "factor",
        "map",
        "bogus",
    ]
)
ops = st.sampled_from(["select", "scale", "transpose", "permute", "in_channels", "pos_embed", "head", "nope"])
rule = st.dictionaries(rule_keys, st.one_of(value, ops), max_size=5)
document = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(text, st.integers()),
        "description": text,
        "verified": st.one_of(st.lists(text, max_size=2), st.integers()),
        "rule": st.one_of(st.lists(rule, max_size=4), st.integers()),
        "unknown": st.integers(),
    },
)
keys = st.lists(st.lists(st.one_of(segment, st.integers(0, 12).map(str)), min_size=1, max_size=4).map(".".join))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=document, names=keys)
def test_random_mapping_files_and_keys_raise_only_weightport_errors(doc, names):
    try:
        mapping = parse_mapping(doc, "random.toml")
    except WeightportError as e:
        assert "random.toml" in str(e)
        return
    for name in names:
        try:
            mapping.resolve(name)
        except WeightportError:
            pass
    try:
        inverse = mapping.inverse()
    except WeightportError:
        return
    for name in names:
        try:
            inverse.resolve(name)
        except WeightportError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    stem=segment,
    layer=st.integers(0, 50),
    part=segment,
    tail=st.lists(segment, min_size=1, max_size=3),
    shift=st.integers(-2, 3),
)
def test_mapping_then_inverse_returns_the_original_names(stem, layer, part, tail, shift):
    layer = max(layer, -shift if shift < 0 else 0)  # an index shifted below 0 is an error, tested elsewhere
    m = wp.Mapping(
        [
            wp.rename(f"{stem}.{{i}}.{part}.{{rest*}}", f"blocks.{{i{shift:+d}}}.x_{part}.{{rest}}"),
            wp.split(f"{stem}.{{i}}.qkv.{{p}}", ["q.{i}.{p}", "k.{i}.{p}", "v.{i}.{p}"]),
            wp.transform(f"{stem}.{{i}}.proj.{{p}}", "proj.{i}.{p}", "transpose"),
        ]
    )
    inv = m.inverse()
    for key in (f"{stem}.{layer}.{part}.{'.'.join(tail)}", f"{stem}.{layer}.qkv.w", f"{stem}.{layer}.proj.b"):
        outs = m.resolve(key).outputs
        back = {inv.resolve(o.target).outputs[0].target for o in outs}
        assert back == {key}
