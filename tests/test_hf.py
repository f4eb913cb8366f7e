"""hf.py's fail-safe rule: a format is claimed only when its reader (our config_from_hf, and transformers when
installed) gets the same model back. Walks dataclasses.fields(GPTConfig), so a field added later is covered."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY
from hf import config_from_hf, hf_config, hf_format, hf_state_dict, load_hf_state_dict
from model import CHOICES, GPT, GPTConfig
from test_switches import NANOCHAT, randomize

BASES = {"gpt2": GPTConfig(**TINY), "nanochat": GPTConfig(**TINY | NANOCHAT)}


def other_values(config: GPTConfig, field: dataclasses.Field) -> list:
    """Legal values of `field` other than config's, chosen by the field's type alone."""
    now, kinds = getattr(config, field.name), {t.strip() for t in field.type.split("|")}
    candidates = [not now] if "bool" in kinds else []
    candidates += list(CHOICES.get(field.name, ())) if "str" in kinds else []
    if "int" in kinds:
        candidates += [1, 2, 4] + ([now + 1, now * 2] if isinstance(now, int) else [])
    if "float" in kinds:
        candidates += [0.5, 2.0] + ([now / 2] if isinstance(now, float) else [])
    candidates += [None] if "None" in kinds else []
    legal = []
    for value in candidates:
        if value != now or type(value) is not type(now):
            try:
                legal.append(dataclasses.replace(config, **{field.name: value}))
            except ValueError:
                pass
    return legal


def read_back(config: GPTConfig, fmt: str) -> GPTConfig:
    """The config a reader of `fmt` sees: config.json without our "smallgpt" entry."""
    seen = {k: v for k, v in hf_config(config).items() if k != "smallgpt"}
    assert seen["model_type"] == fmt
    return config_from_hf(seen, "config.json", None)


def assert_format_reproduces(config: GPTConfig, fmt: str, tmp_path) -> None:
    torch.manual_seed(0)
    ours = randomize(GPT(config).eval())
    idx = torch.randint(0, config.vocab_size, (2, min(20, config.block_size)))
    theirs = GPT(read_back(config, fmt)).eval()
    weights = hf_state_dict(ours)
    missing = {k: torch.zeros_like(t) for k, t in hf_state_dict(theirs).items() if k.endswith(".bias")}
    load_hf_state_dict(theirs, missing | weights)  # missing biases start at 0, as in transformers
    with torch.no_grad():
        expected = ours(idx)[0]
        torch.testing.assert_close(theirs(idx)[0], expected, atol=1e-5, rtol=1e-5, msg=f"{fmt} reader: {config}")
    transformers = pytest.importorskip("transformers")
    save_file(hf_state_dict(ours), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(config)))
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(idx).logits
    assert (logits - expected).abs().max() < 1e-4, f"transformers' {fmt}: {config}"


@pytest.mark.parametrize("fmt", list(BASES))
def test_a_format_is_claimed_only_when_its_reader_gets_the_same_model(fmt, tmp_path):
    assert hf_format(BASES[fmt]) == fmt
    assert_format_reproduces(BASES[fmt], fmt, tmp_path)
    claimed = refused = 0
    for field in dataclasses.fields(GPTConfig):
        variants = other_values(BASES[fmt], field)
        assert variants, f"no legal value found for GPTConfig.{field.name}: teach other_values its type"
        for config in variants:
            got = hf_format(config)
            assert got in (fmt, "smallgpt"), f"{field.name}={getattr(config, field.name)!r} became {got}"
            if got == fmt:
                assert_format_reproduces(config, fmt, tmp_path)
                claimed += 1
            else:
                refused += 1
    assert claimed and refused  # both sides of the rule were exercised


def test_a_field_no_format_names_is_claimed_at_its_default_only():
    fresh = {"window": 4}  # as a switch added after hf.py was written: named in no table
    for fmt, base in BASES.items():
        assert hf_format(dataclasses.replace(base, **fresh)) == "smallgpt"
        assert hf_format(base) == fmt


@pytest.mark.parametrize("fmt", list(BASES))
def test_config_json_from_before_a_field_existed_still_loads(fmt):
    """An older checkpoint's "smallgpt" entry lacks the fields added since: each reads back from the format's own
    keys or as its default, and nothing else changes."""
    written = hf_config(BASES[fmt])
    for field in dataclasses.fields(GPTConfig):
        older = written | {"smallgpt": {k: v for k, v in written["smallgpt"].items() if k != field.name}}
        loaded = config_from_hf(json.loads(json.dumps(older)), "config.json", None)
        assert getattr(loaded, field.name) in (getattr(BASES[fmt], field.name), field.default), field.name
        assert dataclasses.replace(loaded, **{field.name: getattr(BASES[fmt], field.name)}) == BASES[fmt]
