"""User code written against the real ESPnet3 (``espnet3.parallel``, ``espnet3.systems.base``).

The reference tests (``tests/test_espnet3_reference.py``) run these modules as they
are, under ESPnet3 in-process and named in an espnet3-rules Snakemake config; and a
copy made mechanically from the same source with only its import lines switched
(``espnet3.`` -> ``espnet3_rules.``, see :func:`switch_imports`). There is never a
second hand-written copy.

- :mod:`espnet3_user.data`: the deterministic toy dataset, the "models" and the inference
  config's ``output_fn`` (no ESPnet3 imports).
- :mod:`espnet3_user.words`: an ``EnvironmentProvider`` and a ``BaseRunner`` with writer
  hooks, a ``merge`` and a constructor option (``suffix``).
- :mod:`espnet3_user.inference`: an ESPnet3 ``InferenceProvider`` for ESPnet3's own
  ``InferenceRunner``, and the params ESPnet3's ``infer()`` would give it.
- :mod:`espnet3_user.runners`, :mod:`espnet3_user.resume`, :mod:`espnet3_user.inference_cases`:
  the conformance programs (``program_*(output_dir)``, see ``tests/test_espnet3_conformance.py``):
  the "Provider and Runner" page's examples and mistakes; resume and shard locks; InferenceProvider
  and InferenceRunner behaviour. :mod:`espnet3_user.targets`: their Hydra ``_target_`` classes.
- :mod:`espnet3_user.metrics`: a ``BaseMetric`` with states and an artifact, and a provider whose
  ``build_dataset`` gives the references, for ``measure`` (``tests/test_espnet3_measure.py``).

Importing this package itself imports no ESPnet3.
"""

import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

PACKAGE_DIR = Path(__file__).resolve().parent
#: ``from espnet3.x import`` / ``import espnet3.x`` at the start of a line (the import lines only).
_IMPORT_LINE = re.compile(r"^(\s*)(from|import)(\s+)espnet3\.", re.M)


def switch_imports(source: str) -> str:
    """``source`` with each ``from espnet3.`` / ``import espnet3.`` line pointed at ``espnet3_rules.``.

    Nothing but the import lines changes. Raises ``ValueError`` if there are none
    (a switch that changes nothing would compare ESPnet3 with itself).
    """
    switched, count = _IMPORT_LINE.subn(r"\1\2\3espnet3_rules.", source)
    if count == 0:
        raise ValueError("no 'from espnet3.' / 'import espnet3.' line to switch")
    return switched


def write_switched(module: str, directory: Path, name: str) -> Path:
    """Write ``espnet3_user.<module>``'s source, imports switched, as ``<directory>/<name>.py``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    source = (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")
    path.write_text(switch_imports(source), encoding="utf-8")
    return path


@contextmanager
def switched_on_path(directory: Path, copies: Mapping[str, str]) -> Iterator[Path]:
    """Write each ``{module: name}`` copy (:func:`write_switched`) into ``directory``, importable meanwhile."""
    for module, name in copies.items():
        write_switched(module, directory, name)
    sys.path.insert(0, str(directory))
    try:
        yield Path(directory)
    finally:
        sys.path.remove(str(directory))
