"""The example notebook runs end to end on the shared seqFISH slide, with sane numbers, and is saved executed."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "explore_seqfish.ipynb"

# Measured on this notebook (seeded): median held-out correlation 0.805, composition r 0.924, 67.9 % of cells
# on their true spot.  The floors leave room for thread-order rounding, not for a broken pipeline.
FLOORS = {"median held-out correlation": 0.70, "composition vs truth": 0.85, "cells on their true spot": 0.55}
PATTERNS = {
    "median held-out correlation": r"median held-out correlation over 20 genes: ([0-9.]+)",
    "composition vs truth": r"composition vs truth: Pearson r = ([0-9.]+)",
    "cells on their true spot": r"cells on their true spot: ([0-9.]+)%",
}


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _key_numbers(text: str) -> dict[str, float]:
    numbers = {}
    for name, pattern in PATTERNS.items():
        found = re.search(pattern, text)
        assert found, f"the notebook did not print {name!r}"
        numbers[name] = float(found.group(1)) / (100 if name == "cells on their true spot" else 1)
    return numbers


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture
def notebook():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the notebook (the 'test' extra)")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_saved_notebook_holds_its_outputs_and_no_absolute_path(notebook):
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "save the notebook executed (every code cell run)"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert _images(notebook) >= 4, "the figures must be saved in the notebook (PNG outputs)"
    numbers = _key_numbers(_stdout(notebook))
    for name, floor in FLOORS.items():
        assert numbers[name] >= floor, (name, numbers[name])
    source = "\n".join(c.source for c in code)
    assert not re.search(r"""["'](/|~|[A-Za-z]:\\)""", source), "paths in the notebook must be relative"
    assert 'ROOT.parent / "shared" / "data"' in source and "Path.cwd()" in source
    assert str(ROOT) not in NOTEBOOK.read_text(), "the notebook holds this machine's repository path"


def test_the_notebook_runs_with_sane_results(notebook, shared_dataset, monkeypatch):
    shared_dataset("seqfish_mouse_embryo")
    pytest.importorskip("ipykernel", reason="ipykernel is needed to run the notebook (the 'test' extra)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run the notebook (the 'test' extra)")
    # The kernel imports this checkout's ssa_dask, and draws off-screen.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    started = time.perf_counter()
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    elapsed = time.perf_counter() - started
    stderr = [o.text for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"the notebook printed to stderr (warnings leak): {stderr}"
    numbers = _key_numbers(_stdout(notebook))
    for name, floor in FLOORS.items():
        assert numbers[name] >= floor, (name, numbers[name])
    assert _images(notebook) >= 4
    print(json.dumps({"notebook_seconds": round(elapsed, 1), **numbers}))
