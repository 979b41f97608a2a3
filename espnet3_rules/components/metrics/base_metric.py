"""The metric base class (ESPnet3's ``espnet3.components.metrics.base_metric``).

A metric declares ``inputs``/``outputs`` (tuples of :class:`~espnet3_rules.contract.Field`),
keeps its running totals in registered states (:meth:`BaseMetric.add_state`), adds one
batch per :meth:`~BaseMetric.update` and turns the states into its result in
:meth:`~BaseMetric.compute`. Calling it as ``metric(data, test_name, output_dir)`` scores a
test set from SCP files, ``chunk_size`` rows per ``update``.
"""

from __future__ import annotations

import copy
import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from espnet3_rules.contract import Field
from espnet3_rules.contract.metrics import check_metric_batch, check_metric_contract
from espnet3_rules.engine.contracts import ContractAssertionError, ContractError
from espnet3_rules.utils.scp_utils import iter_scp

#: How a state combines across batches and ranks: ``sum`` adds numbers, ``cat`` concatenates lists.
Reduce = Literal["sum", "cat"]
#: A state's value: plain Python only.
StateValue = Union[int, float, List[Any]]


class BaseMetric(ABC):
    """A metric over one test set's inputs, with mergeable states.

    A subclass declares ``inputs`` and ``outputs`` (outputs of kind ``number``),
    as class attributes or, for a contract that depends on its configuration, on
    ``self`` before calling ``super().__init__()`` (which checks them: declaring
    neither is a ``TypeError``). Every ``update`` a subclass defines is wrapped so
    that its batch is checked against ``inputs`` first.

    Examples:
        >>> class Count(BaseMetric):
        ...     inputs = (Field("ref", "text"),)
        ...     outputs = (Field("n", "number"),)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.add_state("n", 0, "sum")
        ...     def update(self, *, ref):
        ...         self.n += len(ref)
        ...     def compute(self):
        ...         return {"n": self.n}
    """

    #: What the metric reads: one Field per SCP input (its name is the key of ``data``).
    inputs: ClassVar[Tuple[Field, ...]]
    #: What the metric returns: one ``number`` Field per result key.
    outputs: ClassVar[Tuple[Field, ...]]
    #: Rows per :meth:`update` call inside :meth:`__call__`.
    chunk_size: ClassVar[int] = 1000
    #: True only while :meth:`__call__` runs with an ``output_dir``: ``update`` may then keep
    #: per-utterance text for :meth:`write_artifacts`. Not a state.
    collect_artifacts: bool = False

    def __init__(self) -> None:
        """Check the declared contract (``self.inputs``/``self.outputs``).

        Raises:
            TypeError: Neither is declared, or the declaration is malformed.
        """
        check_metric_contract(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap the subclass's own concrete ``update`` so each call checks its batch first."""
        super().__init_subclass__(**kwargs)
        update = cls.__dict__.get("update")
        if update is None or getattr(update, "__isabstractmethod__", False):
            return

        @functools.wraps(update)
        def checked_update(self, **values):
            check_metric_batch(self, values)
            return update(self, **values)

        cls.update = checked_update

    # ------------------------------------------------------------ states
    def _state_specs(self) -> Dict[str, Tuple[StateValue, str]]:
        """Registered states: name -> (default, reduce); created by the first :meth:`add_state`."""
        return self.__dict__.setdefault("_state_registry", {})

    def add_state(self, name: str, default: StateValue, reduce: Reduce) -> None:
        """Register a state and set ``self.<name>`` to a copy of ``default``.

        Args:
            name: Attribute name of the state.
            default: Its fresh value: an ``int``/``float`` for ``"sum"``, a ``list`` for ``"cat"``.
            reduce: ``"sum"`` or ``"cat"``: how :meth:`merge_states` combines it.

        Raises:
            ValueError: ``name`` is registered or already an attribute, ``reduce`` is
                unknown, or ``default`` does not fit it.
        """
        specs = self._state_specs()
        if name in specs or hasattr(self, name):
            raise ContractError(f"{type(self).__name__}: state {name!r} is already defined")
        if reduce == "sum":
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise ContractError(f"state {name!r}: 'sum' needs an int or float default, got {default!r}")
        elif reduce == "cat":
            if not isinstance(default, list):
                raise ContractError(f"state {name!r}: 'cat' needs a list default, got {default!r}")
        else:
            raise ContractError(f"state {name!r}: reduce must be 'sum' or 'cat', not {reduce!r}")
        specs[name] = (copy.deepcopy(default), reduce)
        setattr(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        """Set every registered state back to a copy of its default."""
        for name, (default, _) in self._state_specs().items():
            setattr(self, name, copy.deepcopy(default))

    def state(self) -> Dict[str, StateValue]:
        """A deep copy of every registered state, by name (``{}`` when none is registered)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self._state_specs()}

    def merge_states(self, states: Sequence[Mapping[str, StateValue]]) -> Dict[str, StateValue]:
        """Combine per-rank :meth:`state` dicts by each state's reduce rule (``self`` is unchanged).

        Args:
            states: One state dict per rank; ``cat`` states are joined in this order.

        Returns:
            The merged dict; the defaults when ``states`` is empty.

        Raises:
            ValueError: A dict lacks a registered name or has another one.
        """
        specs = self._state_specs()
        if not states:
            return {name: copy.deepcopy(default) for name, (default, _) in specs.items()}
        for one in states:
            self._check_state_names(one)
        return {
            name: sum(one[name] for one in states)
            if reduce == "sum"
            else [item for one in states for item in copy.deepcopy(one[name])]
            for name, (_, reduce) in specs.items()
        }

    def load_state(self, state: Mapping[str, StateValue]) -> None:
        """Set every registered state from ``state`` (e.g. a merged one).

        Raises:
            ValueError: ``state`` lacks a registered name or has another one.
        """
        self._check_state_names(state)
        for name in self._state_specs():
            setattr(self, name, copy.deepcopy(state[name]))

    def _check_state_names(self, state: Mapping[str, StateValue]) -> None:
        names = set(self._state_specs())
        if set(state) != names:
            raise ContractError(
                f"{type(self).__name__}: state names {sorted(state)} do not match the registered {sorted(names)}"
            )

    # ------------------------------------------------------------- hooks
    @abstractmethod
    def update(self, **values: Sequence[Any]) -> None:
        """Add one batch to the states (counts or scores, never rates; no files).

        Args:
            **values: One list per declared input name, all of one length (an
                optional input may be absent); checked before this runs.
        """

    @abstractmethod
    def compute(self) -> Dict[str, float]:
        """The result from the states alone, one value per declared output.

        Returns:
            ``{output name: number}``.

        Raises:
            ValueError: There is nothing to score.
        """

    def write_artifacts(self, test_dir: Path) -> None:
        """Write files for one test set after :meth:`compute` (only from :meth:`__call__` with an
        ``output_dir``); does nothing by default.

        Args:
            test_dir: ``output_dir / test_name``, already created.
        """

    # ------------------------------------------------------------- files
    def __call__(self, data: Dict[str, Path], test_name: str, output_dir: Optional[Path] = None) -> Dict[str, float]:
        """Score one test set from its SCP files: reset, ``update`` per ``chunk_size`` rows, ``compute``,
        then :meth:`write_artifacts` into ``output_dir / test_name`` when ``output_dir`` is given.

        Args:
            data: Declared input name -> SCP file (the names present in ``data`` are read).
            test_name: The test set.
            output_dir: Root for artifacts; ``None`` writes nothing.

        Returns:
            What :meth:`compute` returns.
        """
        self.reset()
        self.collect_artifacts = output_dir is not None
        try:
            names = [field.name for field in self.inputs if field.name in data]
            if names:
                chunk: Dict[str, List[str]] = {name: [] for name in names}
                for _, row in self.iter_inputs(data, *names):
                    for name in names:
                        chunk[name].append(row[name])
                    if len(chunk[names[0]]) == self.chunk_size:
                        self.update(**chunk)
                        chunk = {name: [] for name in names}
                if chunk[names[0]]:
                    self.update(**chunk)
            result = self.compute()
            if output_dir is not None:
                test_dir = Path(output_dir) / test_name
                test_dir.mkdir(parents=True, exist_ok=True)
                self.write_artifacts(test_dir)
            return result
        finally:
            self.collect_artifacts = False

    def iter_inputs(self, data: Mapping[str, Path], *keys: str) -> Iterator[Tuple[str, Dict[str, str]]]:
        """``(utt_id, {key: value})`` from one or more SCP files read in lockstep, in file order.

        Args:
            data: Input name -> SCP file.
            *keys: The names to read together, e.g. ``"ref", "hyp"``.

        Raises:
            AssertionError: No key given, files of different lengths, or ids that
                differ between the files at the same line.
        """
        if not keys:
            raise ContractAssertionError(f"{type(self).__name__}.iter_inputs: At least one SCP key is required")
        iterators = [iter_scp(data[key]) for key in keys]
        ended = object()
        while True:
            rows = [next(iterator, ended) for iterator in iterators]
            finished = [key for key, row in zip(keys, rows) if row is ended]
            if len(finished) == len(keys):
                return
            if finished:
                raise ContractAssertionError(
                    f"SCP length mismatch across keys: {list(keys)}; {[str(data[key]) for key in finished]} "
                    "ended before the others"
                )
            utt_id = rows[0][0]
            for key, (other_id, _) in zip(keys[1:], rows[1:]):
                if other_id != utt_id:
                    raise ContractAssertionError(
                        f"UID mismatch between {keys[0]} and {key}: {utt_id} != {other_id} "
                        f"({data[keys[0]]}, {data[key]})"
                    )
            yield utt_id, {key: value for key, (_, value) in zip(keys, rows)}
