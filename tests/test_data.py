"""Data formats, detection, shaping for TRL, and malformed records named by file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloudtune.errors import DataError
from cloudtune.spec import parse_spec
from cloudtune.trainer.data import load_for_training, to_trl_rows, validate_data


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _spec(train: str, **data) -> object:
    return parse_spec({"model": "tiny:reverse", "data": {"train": train, **data}})


ALPACA = {"instruction": "Reverse the string.", "input": "abc", "output": "cba"}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
MESSAGES = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
TEXT = {"text": "some raw text"}
PREF = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("record,fmt", [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages"),
                                        (TEXT, "text")])
def test_auto_detects_each_format(tmp_path: Path, record, fmt):
    path = _jsonl(tmp_path / "d.jsonl", [record] * 3)
    summary = validate_data(_spec(str(path)))
    assert (summary.format, summary.records, summary.checked) == (fmt, 3, True)


def test_preference_needs_dpo_stage(tmp_path: Path):
    path = _jsonl(tmp_path / "p.jsonl", [PREF])
    with pytest.raises(DataError, match="need stage: dpo"):
        validate_data(_spec(str(path)))
    spec = parse_spec({"model": "m", "stage": "dpo", "data": {"train": str(path)}})
    assert validate_data(spec).format == "preference"
    alpaca = _jsonl(tmp_path / "a.jsonl", [ALPACA])
    with pytest.raises(DataError, match="stage dpo needs preference records"):
        validate_data(parse_spec({"model": "m", "stage": "dpo", "data": {"train": str(alpaca)}}))


@pytest.mark.parametrize("bad,message", [
    ({"instruction": "x", "input": "y"}, r"d\.jsonl:3: field 'output' is missing"),
    ({"instruction": "x", "output": 5}, r"d\.jsonl:3: field 'output' must be a string, got int"),
    ({"instruction": "  ", "output": "y"}, r"d\.jsonl:3: field 'instruction' is empty"),
    ("{not json", r"d\.jsonl:3: not valid JSON"),
    ("[1, 2]", r"d\.jsonl:3: expected a JSON object"),
])
def test_malformed_alpaca_record_names_file_line_field(tmp_path: Path, bad, message):
    path = _jsonl(tmp_path / "d.jsonl", [ALPACA, ALPACA, bad])
    with pytest.raises(DataError, match=message):
        validate_data(_spec(str(path), format="alpaca"))


def test_blank_lines_keep_line_numbers(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(MESSAGES) + "\n\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'messages\[0\]\.role' is 'bot'; expected one of system"):
        validate_data(_spec(str(path)))


def test_sharegpt_turn_errors(tmp_path: Path):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]}
    path = _jsonl(tmp_path / "s.jsonl", [SHAREGPT, bad])
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'conversations\[1\]\.value' must be a string"):
        validate_data(_spec(str(path)))


def test_unknown_shape_and_missing_file(tmp_path: Path):
    path = _jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot tell the data format from fields \['answer', 'question'\]"):
        validate_data(_spec(str(path)))
    with pytest.raises(DataError, match="data file '.*nope.jsonl' not found"):
        validate_data(_spec(str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        validate_data(_spec(str(empty)))


def test_json_array_and_parquet(tmp_path: Path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([ALPACA, ALPACA, {"instruction": "x"}], indent=2))
    with pytest.raises(DataError, match=r"a\.json: record 3: field 'output' is missing"):
        validate_data(_spec(str(arr)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ALPACA] * 4), tmp_path / "d.parquet")
    assert validate_data(_spec(str(tmp_path / "d.parquet"))).records == 4


def test_validation_split_is_deterministic(tmp_path: Path):
    path = _jsonl(tmp_path / "d.jsonl", [{**ALPACA, "input": str(i)} for i in range(20)])
    spec = _spec(str(path), val_split=0.25)
    summary = validate_data(spec)
    assert (summary.records, summary.validation_records) == (15, 5)
    a_train, a_val, _ = load_for_training(spec)
    b_train, b_val, _ = load_for_training(spec)
    assert [r.data for r in a_val] == [r.data for r in b_val] and len(a_train) == 15
    assert {r.data["input"] for r in a_train}.isdisjoint({r.data["input"] for r in a_val})
    vfile = _jsonl(tmp_path / "v.jsonl", [TEXT])
    with pytest.raises(DataError, match=r"v\.jsonl:1: field 'instruction' is missing"):  # checked as alpaca
        validate_data(_spec(str(path), validation=str(vfile)))


def test_shapes_for_trl(tmp_path: Path):
    from cloudtune.trainer.data import Record

    rec = Record(ALPACA, "x:1")
    chat = to_trl_rows([rec], "alpaca", chat=True)[0]
    assert chat == {"prompt": [{"role": "user", "content": "Reverse the string.\n\nabc"}],
                    "completion": [{"role": "assistant", "content": "cba"}]}
    plain = to_trl_rows([rec], "alpaca", chat=False)[0]
    assert plain["prompt"].startswith("### Instruction:\nReverse the string.") and plain["completion"] == "cba"
    sg = to_trl_rows([Record(SHAREGPT, "x:1")], "sharegpt", chat=True)[0]
    assert sg == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    pref = to_trl_rows([Record(PREF, "x:1")], "preference", chat=True)[0]
    assert pref["chosen"] == [{"role": "assistant", "content": "4"}]
    # without a chat template, a DPO prompt gets the SFT stage's Alpaca frame (not glued to the answer)
    assert to_trl_rows([Record(PREF, "x:1")], "preference", chat=False)[0] == {
        "prompt": "### Instruction:\n2+2?\n\n### Response:\n", "chosen": "4", "rejected": "5"}
    assert to_trl_rows([Record({"body": "t"}, "x:1")], "text", chat=True, text_field="body") == [{"text": "t"}]


def test_hub_id_is_unchecked_offline_then_clear_error():
    spec = _spec("someorg/somedataset")
    summary = validate_data(spec)
    assert not summary.checked and summary.records == 0
    with pytest.raises(DataError, match="cannot load hub dataset 'someorg/somedataset'"):
        load_for_training(spec)


def test_validate_data_is_import_light(tmp_path: Path):
    path = _jsonl(tmp_path / "d.jsonl", [ALPACA])
    code = (
        "import sys; from cloudtune.spec import parse_spec; from cloudtune.trainer.data import validate_data;"
        f"s = validate_data(parse_spec({{'model': 'm', 'data': {{'train': {str(path)!r}}}}}));"
        "assert s.records == 1;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'boto3', 'trl') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_s3_data_over_moto(tmp_path: Path, aws_env):
    from cloudtune.store.s3 import S3Store

    s3 = S3Store("s3://ct-data-test", endpoint_url=aws_env, region="us-east-1")
    s3.create_bucket()
    s3.put_bytes("sets/train.jsonl", (json.dumps(ALPACA) + "\n{broken\n").encode())
    spec = parse_spec({"model": "m", "data": {"train": "s3://ct-data-test/sets/train.jsonl"},
                       "store": {"url": "s3://ct-data-test/jobs", "endpoint_url": aws_env}})
    with pytest.raises(DataError, match=r"s3://ct-data-test/sets/train\.jsonl:2: not valid JSON"):
        validate_data(spec)
    spec.data.train = "s3://ct-data-test/sets/missing.jsonl"
    with pytest.raises(DataError, match="does not exist"):
        validate_data(spec)


# ------------------------------------------------------------------ shapes users bring (issue 13)

TOOL_CHAT = {"messages": [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "-3C."}]}]}


def test_prompt_completion_string_and_conversational(tmp_path: Path):
    from cloudtune.trainer.data import Record

    s = {"prompt": "2+2=", "completion": "4"}
    c = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    for rec in (s, c):
        assert validate_data(_spec(str(_jsonl(tmp_path / "pc.jsonl", [rec] * 2)))).format == "prompt_completion"
    assert to_trl_rows([Record(s, "x:1")], "prompt_completion", chat=False, eos="</s>") == [
        {"prompt": "2+2=", "completion": "4</s>"}]
    assert to_trl_rows([Record(s, "x:1")], "prompt_completion", chat=True) == [
        {"prompt": [{"role": "user", "content": "2+2="}], "completion": [{"role": "assistant", "content": "4"}]}]
    bad = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "user", "content": "4"}]}
    with pytest.raises(DataError, match=r"pc\.jsonl:1: field 'completion' has no assistant turn"):
        validate_data(_spec(str(_jsonl(tmp_path / "pc.jsonl", [bad]))))


def test_openai_tool_calls_and_content_parts(tmp_path: Path):
    from cloudtune.trainer.data import Record

    assert validate_data(_spec(str(_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT])))).format == "messages"
    msgs = to_trl_rows([Record(TOOL_CHAT, "x:1")], "messages", chat=True)[0]["messages"]
    assert msgs[1]["content"] == "" and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert msgs[2]["tool_call_id"] == "c1" and msgs[3]["content"] == "It is -3C."
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'messages\[0\]\.content\[0\]' is a 'image_url' part"):
        validate_data(_spec(str(_jsonl(tmp_path / "t.jsonl", [TOOL_CHAT, image]))))
    null = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'messages\[1\]\.content' must be a string, a list of"):
        validate_data(_spec(str(_jsonl(tmp_path / "t.jsonl", [null]))))


def test_utf8_bom_is_not_data(tmp_path: Path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ALPACA) + "\n").encode() * 2)
    assert validate_data(_spec(str(path))).records == 2
    arr = tmp_path / "bom.json"
    arr.write_bytes(b"\xef\xbb\xbf" + json.dumps([ALPACA, ALPACA, ALPACA]).encode())
    assert validate_data(_spec(str(arr))).records == 3


def test_missing_file_with_a_suffix_is_not_a_hub_dataset(tmp_path: Path):
    with pytest.raises(DataError, match=r"data file 'dir/x\.csv' not found"):
        validate_data(_spec("dir/x.csv"))
    assert not validate_data(_spec("someorg/some.dataset")).checked  # a hub id with a dot still is one


def test_implicit_prompt_preference_takes_the_shared_start(tmp_path: Path):
    from cloudtune.trainer.data import Record

    user = {"role": "user", "content": "2+2?"}
    rec = {"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]}
    spec = parse_spec({"model": "m", "stage": "dpo", "data": {"train": str(_jsonl(tmp_path / "p.jsonl", [rec]))}})
    assert validate_data(spec).format == "preference"
    row = to_trl_rows([Record(rec, "x:1")], "preference", chat=True)[0]
    assert row == {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
                   "rejected": [{"role": "assistant", "content": "5"}]}
    text = to_trl_rows([Record({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "x:1")],
                       "preference", chat=False)[0]
    assert (text["chosen"], text["rejected"]) == ("blue.", "green.") and "The sky is " in text["prompt"]
    unrelated = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                 "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    spec.data.train = str(_jsonl(tmp_path / "q.jsonl", [unrelated]))
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'prompt' is missing .* add a 'prompt' field"):
        validate_data(spec)


def test_alpaca_frame_matches_the_sft_stage():
    from cloudtune.trainer.data import ALPACA_TEMPLATE_INPUT, Record

    sft = to_trl_rows([Record(ALPACA, "x:1")], "alpaca", chat=False)[0]["prompt"]
    dpo = to_trl_rows([Record({"prompt": "Reverse the string.\n\nabc", "chosen": "cba", "rejected": "abc"}, "x:1")],
                      "preference", chat=False)[0]["prompt"]
    assert sft == dpo == ALPACA_TEMPLATE_INPUT.format(instruction="Reverse the string.", input="abc")
