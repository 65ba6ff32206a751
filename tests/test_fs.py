"""loralab.fs: a file is whole or absent after a crash, concurrent writers leave one whole file, JSON round-trips."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab import fs

ROOT = Path(__file__).resolve().parents[1]


def test_crash_inside_the_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = fs.atomic_write_text(tmp_path / "a.json", "old")

    def half_then_die(self, data):  # half the bytes reach the disk, then the "process" dies
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        fs.atomic_write_json(path, {"new": "x" * 1000})
    monkeypatch.undo()
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_failed_rename_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = fs.atomic_write_text(tmp_path / "a.txt", "old")

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(fs.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        fs.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_first_write_that_fails_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with fs.atomic_path(tmp_path / "sub" / "x.h5") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert list((tmp_path / "sub").iterdir()) == []


def test_each_write_gets_its_own_temp_name_and_normal_permissions(tmp_path):
    path = tmp_path / "x.bin"
    with fs.atomic_path(path) as a, fs.atomic_path(path) as b:  # two writers of one path at once
        assert a != b and a.parent == b.parent == tmp_path
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert path.read_bytes() == b"a" and list(tmp_path.iterdir()) == [path]  # the last rename wins, whole
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: others may read run files


WRITER = """
import sys
from loralab.fs import atomic_write_json
path, tag = sys.argv[1], sys.argv[2]
for i in range(150):
    atomic_write_json(path, {"writer": tag, "i": i, "payload": [tag * 64] * 2000})
"""


@pytest.mark.slow
def test_concurrent_writers_from_two_processes_leave_one_whole_file(tmp_path):
    path = tmp_path / "shared.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], env=env) for tag in "ab"]
    seen: list[str] = []
    while any(p.poll() is None for p in procs):  # read while both write: never a torn or mixed file
        if path.exists():
            data = json.loads(path.read_text())
            assert data["payload"] == [data["writer"] * 64] * 2000
            seen.append(data["writer"])
        time.sleep(0.005)
    assert [p.returncode for p in procs] == [0, 0]
    assert len(seen) >= 10 and set(seen) <= {"a", "b"}  # the whole-file check ran, on files of both writers' shape
    final = json.loads(path.read_text())
    assert final["i"] == 149 and final["payload"] == [final["writer"] * 64] * 2000
    assert list(tmp_path.iterdir()) == [path]


def test_json_round_trip(tmp_path):
    data = {"labels": ["long", "short"], "nested": {"x": [1, 2.5, None, True]}, "text": "é ✓"}
    path = fs.atomic_write_json(tmp_path / "deep" / "d.json", {**data, "path": tmp_path})
    assert json.loads(path.read_text(encoding="utf-8")) == {**data, "path": str(tmp_path)}  # unknown types as str


def test_sha256_file(tmp_path):
    blob = os.urandom(3 << 20)  # more than one read chunk
    path = fs.atomic_write_bytes(tmp_path / "w.bin", blob)
    assert fs.sha256_file(path) == hashlib.sha256(blob).hexdigest()
