"""colab.ipynb runs, executed as Colab would but on the CPU with COLAB_SMOKE=1 (the tiny ladder only,
into a temporary folder): every cell without an error, growth keeps the function, and the plot is drawn.

    python -m pytest -q test_notebook.py          (about 20 s on 2 cores)
"""

import json
import os
import re

import nbclient
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def test_colab_notebook_runs_the_tiny_ladder_on_the_cpu(tmp_path, monkeypatch):
    for key, value in dict(COLAB_SMOKE="1", NB_OUT=str(tmp_path / "out"), NB_DATA=str(tmp_path / "data"),
                           CUDA_VISIBLE_DEVICES="").items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.read(os.path.join(HERE, "colab.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    grow = re.search(r"after growth: parent-tier val bpb (\S+) \(parent's last (\S+)\)", text)
    assert grow and abs(float(grow[1]) - float(grow[2].rstrip(")"))) < 1e-4, text[-3000:]
    assert "skipping the real ladder" in text and "ROMEO:" in text
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs), "the plot is drawn"
    assert (tmp_path / "out" / "bpb_vs_flops.png").stat().st_size > 0
    # Colab's torch and Jupyter stay: the notebook installs every other requirement
    reqs = (tmp_path / "out" / "requirements-without-torch.txt").read_text()
    assert "sentencepiece" in reqs and not re.search(r"^\s*(torch|nbclient|nbformat|ipykernel)\b", reqs, re.M)
    log = [json.loads(line) for line in open(tmp_path / "out" / "tiny_stage2" / "log.jsonl")]
    assert [e["event"] for e in log][0] == "grow" and log[-1]["iter"] == 300
