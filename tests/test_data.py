"""The SFT data pipeline: packing parity, world-size-invariant sampling, caching, overlong handling, bad data."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import DataConfig
from launch.data import IGNORE_INDEX, DataError, GlobalBatchSampler, build_tokenized, collate


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def chat(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def test_packed_rows_give_each_example_its_own_logits(tiny_backbone):
    data = build_tokenized(
        DataConfig(path="bundled", format="chat", max_length=96, packing=True), tiny_backbone, "train"
    )
    assert data.packed and 0.0 <= data.padding_fraction < 0.5
    model = tiny_backbone.llm.eval()
    rows = [data.dataset[i] for i in range(3)]
    batch = collate(rows, tiny_backbone.tokenizer.pad_token_id, layout="packed")
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        checked = 0
        for row_index, row in enumerate(rows):
            positions = row["position_ids"]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, b in zip(starts, starts[1:]):
                if all(label == IGNORE_INDEX for label in row["labels"][a:b]):
                    continue  # the padding tail
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]]), use_cache=False).logits[0]
                torch.testing.assert_close(packed_logits[row_index, a:b], alone, rtol=0, atol=1e-5)
                checked += 1
    assert checked >= 6  # several examples per row were compared


def test_unpacked_batches_are_right_padded_with_masked_labels(tiny_backbone):
    data = build_tokenized(DataConfig(path="bundled", format="alpaca", max_length=128), tiny_backbone, "train")
    batch = collate([data.dataset[i] for i in range(4)], tiny_backbone.tokenizer.pad_token_id, layout="padded")
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == tiny_backbone.tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding


@pytest.mark.parametrize("global_batch", [8, 16])
def test_sampler_gives_the_same_global_batches_for_any_world_size_and_micro_batch(global_batch):
    sampler = GlobalBatchSampler(num_examples=103, global_batch_size=global_batch, seed=7)
    for step in range(sampler.steps_per_epoch * 2 + 1):  # crosses an epoch boundary
        reference = sampler.global_batch(step)
        assert len(set(reference)) == global_batch
        for world in (1, 2, 4):
            for micro in (1, 2, global_batch // world):
                if (global_batch // world) % micro:
                    continue
                seen = [
                    i for rank in range(world) for mb in sampler.micro_batches(step, rank, world, micro) for i in mb
                ]
                assert seen == reference, (step, world, micro)
    epoch0 = [i for s in range(sampler.steps_per_epoch) for i in sampler.global_batch(s)]
    assert len(set(epoch0)) == len(epoch0)  # no example twice within an epoch
    assert sampler.global_batch(sampler.steps_per_epoch) != sampler.global_batch(0)  # reshuffled per epoch


def test_tokenization_is_cached_for_the_second_run(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "home"))  # entries are keyed by content: start empty
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("What is 1 plus 1?", "2"))] * 5)
    cfg = DataConfig(path=path, format="chat")
    first, second = build_tokenized(cfg, tiny_backbone, "train"), build_tokenized(cfg, tiny_backbone, "train")
    assert not first.from_cache and second.from_cache
    assert [e["input_ids"] for e in first.dataset] == [e["input_ids"] for e in second.dataset]
    write_jsonl(tmp_path / "d.jsonl", [chat(("What is 1 plus 2?", "3"))] * 5)  # new content -> new cache entry
    assert not build_tokenized(cfg, tiny_backbone, "train").from_cache


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(tiny_backbone, tmp_path, mode):
    rows = [chat(("hi", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3))] * 2 + [chat(("hi", "yes"))] * 3
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format="chat", max_length=32, overlong=mode)
    data = build_tokenized(cfg, tiny_backbone, "train")
    assert data.overlong == 2
    assert len(data.dataset) == (5 if mode == "truncate" else 3)
    assert max(data.dataset.lengths) <= 32


def test_dropping_a_whole_tokenizer_batch_or_every_example(tiny_backbone, tmp_path):
    long, short = chat(("hi", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3)), chat(("hi", "yes"))
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", [long] * 1000 + [short] * 7), format="chat",
                     max_length=32, overlong="drop")  # fmt: skip
    data = build_tokenized(cfg, tiny_backbone, "train")  # the first batch of 1000 leaves nothing
    assert (data.overlong, len(data.dataset)) == (1000, 7)
    cfg.path = write_jsonl(tmp_path / "e.jsonl", [long] * 3)
    with pytest.raises(DataError, match="every example is longer than --data.max_length=32"):
        build_tokenized(cfg, tiny_backbone, "train")


def test_alpaca_and_text_formats_with_field_overrides(tiny_backbone, tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"q": "Add the two numbers.", "ctx": "2 3", "a": "5"}])
    data = build_tokenized(
        DataConfig(path=alpaca, format="alpaca", instruction_field="q", input_field="ctx", output_field="a"),
        tiny_backbone,
        "train",
    )
    ids, labels = data.dataset[0]["input_ids"], data.dataset[0]["labels"]
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tiny_backbone.tokenizer.decode(supervised) == "5 </s>"
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "plain text to model"}])
    data = build_tokenized(DataConfig(path=text, format="text", text_field="body"), tiny_backbone, "train")
    assert all(label != IGNORE_INDEX for label in data.dataset[0]["labels"][1:])


def test_parquet_and_json_files_load(tiny_backbone, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat(("What is 1 plus 1?", "2"))] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        assert len(build_tokenized(DataConfig(path=str(tmp_path / name)), tiny_backbone, "train").dataset) == 3


BAD = {
    "malformed_json_line": (
        [chat(("a", "b")), '{"messages": [', chat(("a", "b"))],
        "chat",
        r"d\.jsonl:2: malformed JSON",
    ),
    "missing_field": ([{"instruction": "x"}], "alpaca", r"d\.jsonl:1: missing field 'output'"),
    "missing_messages": ([{"text": "x"}], "chat", r"d\.jsonl:1: missing field 'messages'"),
    "empty_conversation": ([{"messages": []}], "chat", r"d\.jsonl:1: empty conversation"),
    "wrong_role_order": (
        [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}],
        "chat",
        r"d\.jsonl:1: wrong role order: message 0 has role 'assistant', expected 'user'",
    ),
    "ends_with_user": ([{"messages": [{"role": "user", "content": "y"}]}], "chat", r"d\.jsonl:1: .*ends with a user"),
    "empty_dataset": ([], "chat", r"d\.jsonl: the dataset is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_fails_with_file_line_and_expectation(tiny_backbone, tmp_path, case):
    rows, fmt, message = BAD[case]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format=fmt)
    with pytest.raises(DataError, match=message):
        build_tokenized(cfg, tiny_backbone, "train")


def test_missing_data_file_names_the_path_and_flag(tiny_backbone, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file \(--data\.path"):
        build_tokenized(DataConfig(path=str(tmp_path / "nope.jsonl")), tiny_backbone, "train")


def test_dataset_directory_loads_through_the_hub_dataset_path(tiny_backbone, tmp_path):
    pytest.importorskip("datasets", reason="a dataset directory is read by `datasets`, which the GPU image lacks")
    directory = tmp_path / "my-dataset"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", [chat(("What is 1 plus 1?", "2"))] * 4)
    data = build_tokenized(DataConfig(path=str(directory), format="chat", split="train"), tiny_backbone, "train")
    assert len(data.dataset) == 4
    with pytest.raises(DataError, match="could not load split 'validation'"):
        build_tokenized(DataConfig(path=str(directory), format="chat", split="validation"), tiny_backbone, "train")


def many_rows(n: int) -> list[dict]:
    return [chat((f"What is {i} plus {i % 7}?", str(i + i % 7))) for i in range(n)]


def test_a_source_in_many_parts_tokenizes_in_workers_to_the_same_examples(tiny_backbone, tmp_path, monkeypatch):
    from launch.data import sources

    path = write_jsonl(tmp_path / "d.jsonl", many_rows(600))
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "one"))
    whole = build_tokenized(DataConfig(path=path), tiny_backbone, "train").dataset
    monkeypatch.setattr(sources, "MIN_PART_BYTES", 4096)  # ~60 rows a part: 10 parts, tokenized by 2 forked workers
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "many"))
    parts = build_tokenized(DataConfig(path=path), tiny_backbone, "train").dataset
    assert len(parts.parts) >= 8 and len(parts) == len(whole) == 600
    assert [parts[i] for i in range(600)] == [whole[i] for i in range(600)]
    assert all(isinstance(a, np.memmap) for part in parts.parts for a in part.values())  # read through memory maps


def test_a_stopped_tokenization_keeps_its_parts_and_the_next_run_builds_only_the_rest(tiny_backbone, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    import launch.data
    from launch.data import TokenizingStopped, sources, workers

    path = write_jsonl(tmp_path / "d.jsonl", many_rows(600))
    monkeypatch.setattr(sources, "MIN_PART_BYTES", 4096)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 1)  # parts in turn, in this process
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "home"))
    built = []
    real = launch.data.tokenize_part
    monkeypatch.setattr(launch.data, "tokenize_part", lambda part, *a: built.append(part.index) or real(part, *a))
    asked = iter([False, False, False, True])  # a signal arrives while the 4th part is due
    with pytest.raises(TokenizingStopped):
        build_tokenized(DataConfig(path=path), tiny_backbone, "train", should_stop=lambda: next(asked))
    assert built == [0, 1, 2]
    resumed = build_tokenized(DataConfig(path=path), tiny_backbone, "train")
    total = len(resumed.dataset.parts)
    assert built == list(range(3)) + list(range(3, total)) and not resumed.from_cache
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "fresh"))
    fresh = build_tokenized(DataConfig(path=path), tiny_backbone, "train").dataset
    assert [resumed.dataset[i] for i in range(600)] == [fresh[i] for i in range(600)]


def test_tokenizing_in_a_log_file_shows_progress_with_rate_and_eta(tiny_backbone, tmp_path, monkeypatch, caplog):
    from launch.data import sources, workers

    monkeypatch.setattr(sources, "MIN_PART_BYTES", 4096)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(workers.BuildProgress, "every_s", 0.0)  # a line per part
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.INFO, logger="launch.data"):
        build_tokenized(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", many_rows(300))), tiny_backbone, "train")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing ")]
    assert len(lines) >= 3 and all("rows/s" in line and "ETA" in line and "% of the bytes" in line for line in lines)


def test_parquet_shards_by_glob_and_directory(tiny_backbone, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    rows = many_rows(30)
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(rows[k * 10 : (k + 1) * 10]), shards / f"train-{k:05d}.parquet",
                       row_group_size=4)  # fmt: skip
    by_glob = build_tokenized(DataConfig(path=str(shards / "*.parquet")), tiny_backbone, "train").dataset
    by_dir = build_tokenized(DataConfig(path=str(shards)), tiny_backbone, "train").dataset
    assert len(by_glob.parts) == 9 and len(by_glob) == len(by_dir) == 30
    assert by_glob[29] == by_dir[29]
    (shards / "train-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train-00001\.parquet: not a readable parquet file"):
        build_tokenized(DataConfig(path=str(shards)), tiny_backbone, "train")


def test_without_the_datasets_package_local_files_train_and_a_hub_id_says_what_to_install(tiny_backbone, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as on the GPU image
    path = write_jsonl(tmp_path / "d.jsonl", many_rows(5))
    assert len(build_tokenized(DataConfig(path=path), tiny_backbone, "train").dataset) == 5
    with pytest.raises(DataError, match=r"some/hub-dataset: a Hub dataset or dataset directory needs the `datasets`"):
        build_tokenized(DataConfig(path="some/hub-dataset"), tiny_backbone, "train")
