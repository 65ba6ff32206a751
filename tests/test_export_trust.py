"""Nothing an export holds is trusted unchecked: ``loralab.json`` carries its own digest and its values are checked
on load (a temperature of 0 would answer NaN for every row), a truncated one is one line, and a zip is checked
against its manifest entry by entry while it is unpacked, so a bomb costs at most one listed file's worth."""

from __future__ import annotations

import json
import zipfile

import pytest
from test_export import lora_export  # noqa: F401  # the module fixture: one tiny LoRA export

from loralab.archive import zip_dir
from loralab.errors import ExportError
from loralab.export import META_FILE, extract_export, meta_digest
from loralab.inference import load_exported


def copy_export(src, dest, **changes):
    """The export in ``dest`` with ``changes`` to ``loralab.json``, its digest recomputed (a producer's bug, not
    an edit) unless ``digest=...`` is among them."""
    with zipfile.ZipFile(zip_dir(src, dest.with_suffix(".zip"))) as zf:
        zf.extractall(dest)
    meta = json.loads((dest / META_FILE).read_text())
    meta.update(changes)
    if "digest" not in changes:
        meta["digest"] = meta_digest(meta)
    (dest / META_FILE).write_text(json.dumps(meta))
    return dest


def test_the_export_loads_and_its_digest_is_written(lora_export, tmp_path):  # noqa: F811
    meta = json.loads((lora_export["dir"] / META_FILE).read_text())
    assert meta["digest"] == meta_digest(meta)
    assert load_exported(lora_export["dir"]).temperature == meta["temperature"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"temperature": 0}, "temperature=0: must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature=nan: must be a finite number > 0"),
        ({"labels": ["long", "long", "skip"]}, "names must be unique"),
        ({"labels": []}, "must be a non-empty list"),
        ({"max_length": 0}, "max_length=0: must be an int > 0"),
        ({"ensemble": {"weight": 1.5, "baseline_temperature": 1.0}}, "ensemble.weight=1.5: must be a number in"),
    ],
)
def test_a_value_that_cannot_score_is_refused_in_one_line(lora_export, tmp_path, changes, message):  # noqa: F811
    bad = copy_export(lora_export["dir"], tmp_path / "bad", **changes)
    with pytest.raises(ExportError, match=f"^{bad / META_FILE}: .*") as err:
        load_exported(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_edit_after_export_and_a_truncated_file_are_refused(lora_export, tmp_path):  # noqa: F811
    edited = copy_export(lora_export["dir"], tmp_path / "edited")
    meta = json.loads((edited / META_FILE).read_text())
    meta["temperature"] = 2.0  # plausible, but not what the run fitted
    (edited / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="altered after export"):
        load_exported(edited)
    (edited / META_FILE).write_text((edited / META_FILE).read_text()[:50])
    with pytest.raises(ExportError, match=rf"^{edited / META_FILE}: not valid JSON"):
        load_exported(edited)


def test_a_zip_is_checked_against_its_manifest_while_it_unpacks(lora_export, tmp_path):  # noqa: F811
    good = zip_dir(lora_export["dir"], tmp_path / "good.zip")
    assert extract_export(good, tmp_path / "ok")["labels"] == lora_export["meta"]["labels"]
    names = zipfile.ZipFile(good).namelist()
    weights = next(n for n in names if n.endswith("model.safetensors") and n.startswith("merged/"))

    def rezip(path, replace: dict[str, bytes]):
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
            for name in src.namelist():
                out.writestr(name, replace.get(name, src.read(name)))
            for name, data in replace.items():
                if name not in src.namelist():
                    out.writestr(name, data)
        return path

    # A bomb: 256 MiB of zeros (a few hundred kB compressed) in place of the weights; refused before a byte is
    # written, as the manifest gives that file's size.
    bomb = rezip(tmp_path / "bomb.zip", {weights: bytes(256 * 2**20)})
    assert bomb.stat().st_size < good.stat().st_size + 2**20  # the zeros cost well under 1 MB zipped
    with pytest.raises(ExportError, match=rf"entry '{weights}' is {256 * 2**20} bytes, the manifest says"):
        extract_export(bomb, tmp_path / "b")
    assert sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file()) < 2**20
    with pytest.raises(ExportError, match="'merged/extra.txt' is not in the loralab.json manifest"):
        extract_export(rezip(tmp_path / "extra.zip", {"merged/extra.txt": b"x"}), tmp_path / "e")
    size = lora_export["meta"]["files"][weights]["bytes"]
    with pytest.raises(ExportError, match=f"{weights} does not match its sha256"):
        extract_export(rezip(tmp_path / "flip.zip", {weights: bytes(size)}), tmp_path / "f")
    with pytest.raises(ExportError, match="no loralab.json"):
        extract_export(_without_meta(good, tmp_path), tmp_path / "n")


def _without_meta(good, tmp_path):
    path = tmp_path / "nometa.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for name in src.namelist():
            if name != META_FILE:
                out.writestr(name, src.read(name))
    return path
