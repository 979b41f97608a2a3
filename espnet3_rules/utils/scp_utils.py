"""Reading ``<id> <value>`` SCP files and finding a test set's inputs (ESPnet3's ``espnet3.utils.scp_utils``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Sequence, Tuple, Union

from espnet3_rules.engine.contracts import ContractAssertionError, ContractError, ContractFileNotFoundError


def iter_scp(path: Any) -> Iterator[Tuple[str, str]]:
    """``(utt_id, value)`` per non-blank line, split at the first whitespace (value stripped, may be empty).

    Raises:
        FileNotFoundError: The file is missing.
        ContractError: The file is not UTF-8 (naming the line).
    """
    path = Path(path)
    number = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                parts = raw.strip().split(maxsplit=1)
                if parts:
                    yield parts[0], parts[1] if len(parts) > 1 else ""
    except FileNotFoundError:
        raise ContractFileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ContractError(
            f"{path}: text after line {number} is not UTF-8 ({exc.reason}); scp files must be UTF-8"
        ) from None


def read_scp(path: Any) -> Dict[str, str]:
    """An SCP file as ``{utt_id: value}`` in file order; a repeated id is an error."""
    entries: Dict[str, str] = {}
    for utt_id, value in iter_scp(path):
        if utt_id in entries:
            raise ContractError(f"{path}: id {utt_id!r} appears twice")
        entries[utt_id] = value
    return entries


def get_class_path(obj: Any) -> str:
    """``"<module>.<ClassName>"`` of an object's class: the key ``measure`` files a metric's results under."""
    return f"{type(obj).__module__}.{type(obj).__name__}"


def load_scp_paths(
    inference_dir: Any, test_name: str, inputs: Union[Sequence[str], Mapping[str, str]], file_suffix: str = ".scp"
) -> Dict[str, Path]:
    """Map each input alias to ``<inference_dir>/<test_name>/<file><file_suffix>``, checking that it exists.

    Args:
        inference_dir: Holds one directory per test set.
        test_name: The test set.
        inputs: ``alias -> file stem``, or a list of stems that are their own aliases.
        file_suffix: Appended to each stem.

    Returns:
        ``{alias: path}``; no file is read.

    Raises:
        AssertionError: The test set's directory or an input file is missing (the message lists the
            stems the test set has).
    """
    task_dir = Path(inference_dir) / test_name
    if not task_dir.is_dir():
        raise ContractAssertionError(f"Missing hypothesis/reference files in inference_dir: {task_dir} does not exist")
    bindings = dict(inputs) if isinstance(inputs, Mapping) else {name: name for name in inputs}
    paths = {}
    for alias, stem in bindings.items():
        path = task_dir / f"{stem}{file_suffix}"
        if not path.is_file():
            have = sorted(p.name[: -len(file_suffix)] for p in task_dir.glob(f"*{file_suffix}"))
            raise ContractAssertionError(f"Missing SCP file: {path}; {test_name} has {have}")
        paths[alias] = path
    return paths
