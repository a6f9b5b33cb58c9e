"""User data through `datasets`: local files with a column mapping."""

import json

import pytest

from selfdistill.data import load_splits
from selfdistill.recipes import DataSpec, RecipeError


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))


def test_jsonl_with_column_mapping_and_system_prompt(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "worked": f"{i} + 1 = {i + 1}", "final": str(i + 1)} for i in range(6)]
    _write(tmp_path / "train.jsonl", rows[:4])
    _write(tmp_path / "test.jsonl", rows[4:])
    spec = DataSpec(task=None, train_files=str(tmp_path / "train.jsonl"), test_files=str(tmp_path / "test.jsonl"),
                    columns={"prompt": "question", "solution": "worked", "answer": "final"}, system_prompt="Be brief.")
    train, test = load_splits(spec)
    assert len(train) == 4 and len(test) == 2
    assert set(train.column_names) == {"prompt", "solution", "answer"}
    assert train[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 0 + 1?"}]
    assert test[0]["solution"] == "4 + 1 = 5"


def test_mapping_a_missing_column_names_the_columns(tmp_path):
    _write(tmp_path / "train.jsonl", [{"question": "q", "worked": "w"}])
    spec = DataSpec(task=None, train_files=str(tmp_path / "train.jsonl"), columns={"prompt": "questoin"})
    with pytest.raises(RecipeError, match="column 'questoin' not in the train split \\(columns: question, worked\\)"):
        load_splits(spec)


def test_split_off_a_test_set_and_cap_sizes(tmp_path):
    _write(tmp_path / "all.jsonl", [{"prompt": f"q{i}", "solution": "s"} for i in range(20)])
    spec = DataSpec(task=None, train_files=str(tmp_path / "all.jsonl"), test_size=0.25, n_train=5)
    train, test = load_splits(spec)
    assert len(train) == 5 and len(test) == 5
    assert not set(r[0]["content"] for r in train["prompt"]) & set(r[0]["content"] for r in test["prompt"])


def test_unknown_file_type(tmp_path):
    with pytest.raises(RecipeError, match="use .json, .jsonl, .parquet or .csv"):
        load_splits(DataSpec(task=None, train_files=str(tmp_path / "x.txt")))


def test_a_missing_file_and_a_broken_line_are_named(tmp_path, monkeypatch):
    _write(tmp_path / "train.jsonl", [{"prompt": "q", "solution": "s"}])
    with pytest.raises(RecipeError, match="data.test_files: '.*nope.jsonl' does not exist"):
        load_splits(DataSpec(task=None, train_files=str(tmp_path / "train.jsonl"),
                             test_files=str(tmp_path / "nope.jsonl")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"'nope.jsonl' does not exist \\(a relative path is read from {tmp_path}\\)"):
        load_splits(DataSpec(task=None, train_files="nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "solution": "b"}\n\n{"prompt": "c", "solution": "d"\n')
    with pytest.raises(RecipeError, match="'broken.jsonl' line 3: not valid JSON .*one JSON object"):
        load_splits(DataSpec(task=None, train_files="broken.jsonl"))
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "solution": "b"}\n[1, 2]\n')
    with pytest.raises(RecipeError, match="'list.jsonl' line 2: not valid JSON \\(a list, not an object\\)"):
        load_splits(DataSpec(task=None, train_files="list.jsonl"))


def test_an_unreachable_dataset_hub_is_named_at_once(monkeypatch):
    import selfdistill.modeling as modeling

    monkeypatch.setattr(modeling, "hub_unreachable", lambda: "huggingface.co does not resolve: no network")

    def no_call(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr("selfdistill.data.load_dataset", no_call)
    with pytest.raises(RecipeError, match="data.hub 'org/x': the dataset hub cannot be reached .*HF_HUB_OFFLINE=1"):
        load_splits(DataSpec(task=None, hub="org/x"))
