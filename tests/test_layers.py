"""The layers stay apart: the ingress (HTTP, traffic, audio) imports no torch, and the model
code (serve_app.inference) and the wire types import no Ray. Each import runs in a fresh
interpreter, so that what this test session already imported cannot hide a dependency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_after(modules: list[str]) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `modules`."""
    code = ("import json, sys\n" + "".join(f"import {name}\n" for name in modules) +
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("modules, absent", [
    (["serve_app.api.ingress", "serve_app.api.pipeline", "serve_app.api.routes",
      "serve_app.api.segments", "serve_app.api.hf", "serve_app.api.kserve"], "torch"),
    (["serve_app.wire", "serve_app.errors", "serve_app.inference.lifecycle",
      "serve_app.inference.engine"], "ray"),
])
def test_layers_leave_out_what_they_must_not_use(modules, absent):
    loaded = imported_after(modules)
    assert "serve_app" in loaded  # the imports ran
    assert absent not in loaded, f"importing {modules} loads {absent}"
