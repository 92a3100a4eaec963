"""The streaming safetensors reader and writer on their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evolution import MergeError
from evolution._tensor_reader import SafetensorsReader
from evolution._tensor_writer import OutTensor, ShardedWriter


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    weights = {
        "a": torch.arange(10, dtype=torch.float32).reshape(2, 5),
        "b": torch.arange(7, dtype=torch.bfloat16),
        "c": torch.tensor(3, dtype=torch.int64),
    }
    save_file(weights, tmp_path / "model.safetensors")
    return tmp_path


def test_reader_reads_whole_tensors_and_runs_of_elements(checkpoint: Path) -> None:
    with SafetensorsReader.open(checkpoint) as reader:
        assert torch.equal(reader.read("a"), torch.arange(10.0).reshape(2, 5))
        assert reader.read("c").item() == 3 and reader.read("c").shape == ()
        staging = torch.empty(4, dtype=torch.uint8)  # 2 bfloat16 values per piece
        out = reader.read_into("b", torch.empty(7), staging)
        assert out.dtype == torch.float32 and torch.equal(out, torch.arange(7.0))
        assert torch.equal(
            reader.read_into("b", torch.empty(3), staging, first=2), torch.tensor([2.0, 3, 4])
        )
        assert torch.equal(
            reader.read_into("a", torch.empty(4), staging, first=6), torch.tensor([6.0, 7, 8, 9])
        )
        with pytest.raises(ValueError, match="within 0..10"):
            reader.read_into("a", torch.empty(4), staging, first=7)
        with pytest.raises(MergeError, match="'zz' is not in"):
            reader.read("zz")


def test_views_map_tensors_copy_on_write_and_refuse_a_shrunk_file(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    original = file.read_bytes()
    with SafetensorsReader.open(checkpoint) as reader:
        a = reader.view("a")
        assert a.dtype == torch.float32 and torch.equal(a, torch.arange(10.0))
        assert torch.equal(reader.view("b")[2:5].float(), torch.tensor([2.0, 3, 4]))
        a[0] = 99.0  # private map: this process's copy only
        reader.release("a", 0, 10)  # dropped pages come back from the file
        assert torch.equal(reader.view("a"), torch.arange(10.0))
        reader.prefetch("a", 5, 5)
        del a
        file.write_bytes(original[:-8])
        with pytest.raises(MergeError, match="shrank while it was being merged"):
            reader.view("b")
    file.write_bytes(original)
    assert file.read_bytes() == original


def test_truncated_file_is_refused_naming_the_tensor(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(MergeError, match="truncated or corrupt") as info:
        SafetensorsReader.open(checkpoint)
    assert info.value.tensor in {"a", "b", "c"}


def test_writer_writes_loadable_shards_in_order_and_checks_the_plan(tmp_path: Path) -> None:
    plan = [OutTensor(f"t{i}", torch.bfloat16, (3, 4)) for i in range(5)]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=50)  # 24-byte tensors: 2 per shard
    assert list(writer.files) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with pytest.raises(ValueError, match="expected tensor 't0'"):
        writer.write("t1", torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected tensor 't0'.*float32"):
        writer.write("t0", torch.zeros(3, 4))
    for i in range(5):
        data = torch.full((3, 4), float(i), dtype=torch.bfloat16)
        if i == 2:  # in pieces
            writer.append("t2", data.reshape(-1)[:5])
            writer.append("t2", data.reshape(-1)[5:])
        else:
            writer.write(f"t{i}", data)
    writer.close()
    loaded = {k: v for f in writer.files for k, v in load_file(tmp_path / f).items()}
    assert all(
        torch.equal(loaded[f"t{i}"], torch.full((3, 4), float(i), dtype=torch.bfloat16))
        for i in range(5)
    )
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(writer.digests) == 3


def test_writer_close_refuses_missing_tensors(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [OutTensor("a", torch.float32, (2,))] * 2, 1 << 30)
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        writer.close()
    writer.abort()
