from pathlib import Path

import pytest

from cloudtune.errors import SpecError
from cloudtune.spec import load_spec, parse_spec

BASE = {"model": "8b", "data": {"train": "data.jsonl"}}


def test_defaults_and_qlora_bits():
    spec = parse_spec({**BASE, "method": "qlora"})
    assert spec.quant_bits == 4
    assert spec.lora.targets == "all-linear"
    assert spec.training.optimizer == "adamw_torch"


def test_lora_targets_comma_list():
    spec = parse_spec({**BASE, "lora": {"targets": "q_proj, v_proj"}})
    assert spec.lora.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({**BASE, "methd": "lora"}, "did you mean 'method'"),
        ({**BASE, "training": {"learning_rat": 1e-4}}, "did you mean 'learning_rate'"),
        ({**BASE, "method": "qlora", "quant_bits": 16}, "qlora needs quant_bits 4 or 8"),
        ({**BASE, "lora": {"rank": 0}}, "lora rank must be >= 1"),
        ({**BASE, "data": {"train": "x", "max_seq_len": 0}}, "max_seq_len must be >= 1"),
        ({**BASE, "training": {"optimizer": "adamw8bit"}}, "unknown optimizer"),
        ({"data": {"train": "x"}}, "missing required key 'model'"),
    ],
)
def test_bad_specs_name_the_problem(data, needle):
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_has_line_and_column(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text("model: 8b\ndata:\n  train: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert "line" in str(err.value) and "column" in str(err.value)


def test_relative_paths_resolve_against_spec_folder(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "job.yaml"
    p.write_text("model: 8b\ndata:\n  train: d.jsonl\n")
    assert load_spec(p).data.train == str(tmp_path / "d.jsonl")
