"""One package: the distribution installs `tessera` and nothing else at the top level of site-packages, and every
module of the four top-level folders is inside it (as tessera.trainer, tessera.kernels, ...)."""

from __future__ import annotations

import importlib.metadata as md
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DIST = "tessera-dalle"
FOLDERS = {
    "tessera": "tessera",
    "trainer": "tessera/trainer",
    "kernels": "tessera/kernels",
    "dataprep": "tessera/dataprep",
    "cluster": "tessera/cluster",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # a copy of the source, so that the build's egg-info and build/ land there and not in the repository
    src = build / "src"
    src.mkdir()
    keep = ["setup.cfg", "pyproject.toml", "README.md", *FOLDERS]
    for name in keep:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PIP_NO_INPUT": "1", "TMPDIR": str(build), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_only_the_tessera_package(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"tessera"}, sorted(tops)
    assert [t.split("-")[0] for t in dist_info] == ["tessera_dalle"]


def test_wheel_holds_every_module_of_the_four_folders(wheel):
    names = set(wheel.namelist())
    for folder, inside in FOLDERS.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder)
            if folder == "tessera" and rel.parts[0] in {"trainer", "kernels", "dataprep", "cluster"}:
                continue
            assert f"{inside}/{rel.as_posix()}" in names, f"{folder}/{rel} is not in the wheel (list its package in setup.cfg)"


def test_installed_distribution_adds_nothing_else_at_the_top_level():
    # the installed one, in site-packages (not an egg-info that a build may have left beside the sources)
    dists = [d for d in md.distributions(path=site.getsitepackages()) if d.metadata["Name"] == DIST]
    assert len(dists) == 1, f"{DIST} is installed {len(dists)} times"
    dist = dists[0]
    files = [str(f) for f in dist.files or [] if not str(f).startswith("..")]  # "../../../bin/tessera": the console script
    tops = {f.split("/")[0] if "__pycache__" not in f else f for f in files}
    # an editable install adds its own path hook (a .pth and a finder module named after the distribution)
    extra = {t for t in tops if not t.endswith(".dist-info") and t != "tessera" and "tessera_dalle" not in t}
    assert not extra, f"files of {DIST} at the top of site-packages: {sorted(extra)}"
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level in ([], ["tessera"]), top_level


def test_bare_folder_names_are_not_importable_from_elsewhere(tmp_path):
    code = "import importlib.util as u, sys; print([n for n in ('trainer', 'kernels', 'dataprep', 'cluster') if u.find_spec(n)])"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    r = subprocess.run(
        [sys.executable, "-c", "import tessera.trainer.dvae, tessera.cluster.dist; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.strip() == "ok", r.stderr
