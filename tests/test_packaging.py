"""Artifacts ship in wheel and editable installs; tokenizers/ is data only; imports stay light."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from cellfoundry.tokenization.registry import shipped_tokenizers


def _python(code: str, **env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return result.stdout.strip()


def test_tokenizers_folder_is_data_only_and_does_not_shadow_hf():
    code_files = [p for p in (REPO / "tokenizers").rglob("*") if p.suffix in {".py", ".pyc"}]
    assert code_files == []
    location = _python("import tokenizers; print(tokenizers.__file__)")
    assert "site-packages" in location and str(REPO / "tokenizers") not in location


def test_editable_install_finds_shipped_tokenizers():
    found = shipped_tokenizers()
    assert {"cf-human-v1", "cf-tiny-test"} <= set(found)
    assert found["cf-human-v1"] == REPO / "tokenizers" / "cf-human-v1"


def test_wheel_carries_tokenizers_gene_maps_and_demo(tmp_path):
    pytest.importorskip("build")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("cellfoundry-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "cellfoundry/_artifacts/tokenizers/cf-human-v1/vocab.json",
        "cellfoundry/_artifacts/tokenizers/cf-human-v1/gene_medians.tsv",
        "cellfoundry/_artifacts/tokenizers/cf-tiny-test/tokenizer_config.json",
        "cellfoundry/_data/genes/human_gencode_v44_genes.tsv.gz",
        "cellfoundry/_data/demo/celltypist_sample.h5ad",
    ):
        assert expected in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = _python(
        "import cellfoundry, cellfoundry.tokenization as t;"
        "tok = t.load_tokenizer('cf-human-v1');"
        "print(cellfoundry.__file__); print(tok.path); print(len(tok.vocab))",
        PYTHONPATH=str(site),
    )
    module_file, tokenizer_path, size = out.splitlines()
    assert module_file.startswith(str(site)) and tokenizer_path.startswith(str(site))
    assert int(size) > 15_000


def test_tokenization_import_is_torch_free():
    out = _python(
        "import sys, cellfoundry.tokenization, cellfoundry.genes;"
        "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    assert out == "[]"


def test_cli_help_imports_nothing_heavy():
    out = _python(
        "import sys\nfrom cellfoundry.cli import main\n"
        "try:\n    main(['tokenize', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('numpy', 'torch', 'datasets', 'anndata') if m in sys.modules])"
    )
    assert out.endswith("[]")
