"""Datasets for recipes: the built-in tasks (arithmetic, codes), local files, or a hub dataset with a column mapping."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from selfdistill.recipes import DataSpec, RecipeError

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _format_of(files: Any) -> str:
    first = files[0] if isinstance(files, list) else files
    for suffix, fmt in _FILE_FORMATS.items():
        if str(first).endswith(suffix):
            return fmt
    raise RecipeError(f"data file {first!r}: use .json, .jsonl, .parquet or .csv")


def _as_chat(value: Any, system_prompt: str | None) -> Any:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    return value


def _map_columns(ds: Dataset, spec: DataSpec, split: str) -> Dataset:
    # columns maps the library's names to the dataset's: {prompt: question, solution: worked_answer}
    for ours, theirs in spec.columns.items():
        if theirs not in ds.column_names:
            raise RecipeError(
                f"data.columns.{ours}: column {theirs!r} not in the {split} split "
                f"(columns: {', '.join(ds.column_names)})"
            )
        if ours != theirs:
            if ours in ds.column_names:
                ds = ds.remove_columns(ours)
            ds = ds.rename_column(theirs, ours)
    if "prompt" not in ds.column_names:
        raise RecipeError(
            f"the {split} split has no 'prompt' column (columns: {', '.join(ds.column_names)}); map one with "
            "data.columns: {prompt: <your question column>}"
        )
    return ds.map(lambda row: {"prompt": _as_chat(row["prompt"], spec.system_prompt)})


def load_splits(spec: DataSpec) -> tuple[Dataset, Dataset | None]:
    """Train and test splits as ``datasets.Dataset`` with a chat ``prompt`` column."""
    if spec.task == "arithmetic":
        from selfdistill.tasks.arithmetic import make_arithmetic_dataset

        dd = make_arithmetic_dataset(
            2000 if spec.n_train is None else spec.n_train,
            200 if spec.n_test is None else spec.n_test,
            seed=spec.seed,
            digits=spec.digits,
            ops=spec.ops,
            **({"prompt_template": spec.prompt_template} if spec.prompt_template else {}),
            choices=spec.choices,
            references=spec.references,
            reference_error=spec.reference_error,
        )
        return dd["train"], dd["test"]
    if spec.task == "codes":
        from selfdistill.tasks.codes import make_codes_dataset

        dd = make_codes_dataset(seed=spec.seed)
        train, test = dd["train"], dd["test"]
        if spec.n_train is not None and len(train) > spec.n_train:
            train = train.select(range(spec.n_train))
        if spec.n_test is not None and len(test) > spec.n_test:
            test = test.select(range(spec.n_test))
        return train, test
    if spec.train_files:
        files = {"train": spec.train_files}
        if spec.test_files:
            files["test"] = spec.test_files
        dd = _load_files(files)
        train_split, test_split = "train", "test" if spec.test_files else None
    else:
        dd = _load_hub(spec)
        train_split, test_split = spec.train_split, spec.test_split if spec.test_split in dd else None
    if not isinstance(dd, DatasetDict) or train_split not in dd:
        raise RecipeError(f"the dataset has no {train_split!r} split; set data.train_split")
    train = dd[train_split]
    test = dd[test_split] if test_split else None
    if test is None and spec.test_size:
        parts = train.train_test_split(test_size=spec.test_size, seed=spec.seed)
        train, test = parts["train"], parts["test"]
    train = _map_columns(train, spec, "train")
    test = _map_columns(test, spec, "test") if test is not None else None
    if spec.n_train is not None and len(train) > spec.n_train:
        train = train.shuffle(seed=spec.seed).select(range(spec.n_train))
    if test is not None and spec.n_test is not None and len(test) > spec.n_test:
        test = test.select(range(spec.n_test))
    return train, test


def _paths(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _load_files(files: dict[str, Any]) -> Any:
    """``load_dataset`` on local files, with a missing file or an unreadable line named instead of a traceback."""
    fmt = _format_of(files["train"])
    for split, value in files.items():
        for path in _paths(value):
            if not glob.has_magic(path) and not os.path.exists(path):
                where = "" if os.path.isabs(path) else f" (a relative path is read from {os.getcwd()})"
                raise RecipeError(f"data.{split}_files: {path!r} does not exist{where}")
    try:
        return load_dataset(fmt, data_files=files)
    except Exception as err:  # datasets wraps the parser's error in DatasetGenerationError
        cause = err.__cause__ or err
        if fmt == "json":
            for split, value in files.items():
                for path in (p for pattern in _paths(value) for p in sorted(glob.glob(pattern))):
                    bad = _bad_json_line(path)
                    if bad:
                        raise RecipeError(f"data.{split}_files: {path!r} line {bad[0]}: not valid JSON ({bad[1]}); "
                                          "each line of a .jsonl file must be one JSON object") from err
        first = str(cause).splitlines()[0][:300] if str(cause) else ""
        raise RecipeError(f"data files {files}: datasets cannot read them as {fmt} "
                          f"({cause.__class__.__name__}: {first})") from err


def _bad_json_line(path: str) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object (a whole-file JSON document: none)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None  # one JSON document (an array or an object): not JSON Lines
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            return number, str(err)
        if not isinstance(row, dict):
            return number, f"a {type(row).__name__}, not an object"
    return None


def _load_hub(spec: DataSpec) -> Any:
    """``load_dataset`` from the hub, named at once when the hub cannot be reached (its client retries for a while)."""
    from selfdistill.modeling import hub_unreachable

    unreachable = hub_unreachable()
    if unreachable:
        raise RecipeError(f"data.hub {spec.hub!r}: the dataset hub cannot be reached from this machine "
                          f"({unreachable}); put the data in files (data.train_files, data.test_files), or set "
                          "HF_HUB_OFFLINE=1 to read a copy in the hub cache")
    try:
        return load_dataset(spec.hub, spec.hub_config)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise RecipeError(f"data.hub {spec.hub!r}: {err.__class__.__name__}: {str(err).splitlines()[0][:300]}") from err
