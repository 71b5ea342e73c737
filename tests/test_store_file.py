from pathlib import Path

import pytest

from cloudtune.store import StoreNotFound, open_store


def test_file_store_roundtrip(tmp_path: Path):
    store = open_store(f"file://{tmp_path}/s")
    store.put_json("job/a.json", {"x": 1})
    store.put_bytes("job/sub/b.bin", b"abc")
    assert store.get_json("job/a.json") == {"x": 1}
    assert store.list("job/") == ["job/a.json", "job/sub/b.bin"]
    assert store.read_json("job/missing.json") is None
    with pytest.raises(StoreNotFound):
        store.get_bytes("job/missing.json")
    src = tmp_path / "f.txt"
    src.write_text("hello")
    store.upload_file(src, "job/f.txt")
    store.download_file("job/f.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "hello"
    store.delete_prefix("job/sub/")
    assert store.list("job/") == ["job/a.json", "job/f.txt"]


def test_file_store_rejects_escaping_keys(tmp_path: Path):
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(ValueError):
        store.put_bytes("../evil", b"x")
