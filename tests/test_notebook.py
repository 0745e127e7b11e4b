"""notebooks/tour.ipynb, executed top to bottom by a real kernel against the test cluster,
including its live alias switch."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO
from tests.waiting import eventually

NOTEBOOK = REPO / "notebooks" / "tour.ipynb"
ARTIFACTS = REPO / "artifacts"


def test_tour_notebook_runs(service, client, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    import ray

    # The config the cluster runs, for the notebook's alias switch: every app it runs (a
    # config deployed without one deletes it), the main app first (its Router is the one the
    # notebook changes).
    others = [app for name, app in service.cluster.apps.items() if name != service.app["name"]]
    config_file = tmp_path / "serve-config.yaml"
    config_file.write_text(yaml.safe_dump({"applications": [service.app, *others]}))
    monkeypatch.setenv("EMOTION2VEC_URL", service.url)
    monkeypatch.setenv("EMOTION2VEC_SERVE_APP_CONFIG", str(config_file))
    monkeypatch.setenv("EMOTION2VEC_RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("EMOTION2VEC_CLIPS", raising=False)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    try:
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        nbformat.write(notebook, ARTIFACTS / "tour-executed.ipynb")
        # Put the test cluster back as it was (the notebook re-pointed an alias).
        service.cluster.put(service.app)
        eventually(lambda: client.get("/v1/models").json()["aliases"].get("fast") == "turbo",
                   "the alias fast -> turbo restored", 60, interval_s=0.5)

    outputs = [out for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "\n".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    markdown = "\n".join(out.data["text/markdown"] for out in outputs
                         if "text/markdown" in out.get("data", {}))
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # the scores per variant, the timeline, the conversation, the head's confusion matrix
    assert len(images) == 4
    for variant in ("base", "large", "turbo"):
        assert f"| {variant} | ready | random |" in markdown
        assert f"| low_tone.wav | {variant} |" in markdown
    assert "WARNING: some variants serve random weights" in text
    assert "max |large - turbo|" in text
    assert "leading emotion per window:" in text
    assert "| speaker | utterances | speech s | emotion | confidence |" in markdown
    assert "| agent | 3 |" in markdown and "| customer | 3 |" in markdown
    assert "VAD found " in text and "(the script has 6 turns)" in text
    assert "tour-tones@" in text and "shuffled-label control UA" in text
    assert "'name': 'tour-tones'" in text  # predicted with the head just trained
    assert "before: fast -> turbo; answered by turbo" in text
    assert "after:  fast -> base; answered by base" in text
