"""The GPU install path (requirements-gpu.txt + tools/gpu_prepare.sh), checked offline on a CPU.

* The Transformer Engine pin of requirements-gpu.txt lies inside the TE range that the INSTALLED
  megatron-core declares in its own metadata (0.16.1: >=2.9,<2.12; 0.19.2 declares none), and
  requirements-gpu.txt never names torch.
* ``pip install --dry-run`` of the documented command into an environment whose torch must stay
  (a fresh virtualenv holding only a stand-in ``torch 2.11.0+cu130`` distribution, like the
  CUDA machines' torch) resolves from a local directory of stand-in wheels (``--no-index``: no
  download) that also offers a NEWER torch: with the constraints that ``tools/gpu_prepare.sh
  constraints`` prints, pip's report installs megatron-core and TE but no torch, even with
  ``--upgrade --upgrade-strategy eager``; the same command without the constraints would replace
  torch (the control: the test can fail).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ_GPU = ROOT / "requirements-gpu.txt"
PREPARE = ROOT / "tools" / "gpu_prepare.sh"
INSTALLED_TORCH = "2.11.0+cu130"   # what the CUDA machine has; must stay


def _requirements(path: Path) -> list:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def _pinned(reqs: list, name: str) -> Version:
    found = [r for r in reqs if canonicalize_name(r.name) == canonicalize_name(name)]
    assert len(found) == 1, f"requirements-gpu.txt must name {name} once: {found}"
    (spec,) = list(found[0].specifier)
    assert spec.operator == "==", f"{name} must be pinned with ==, got {found[0]}"
    return Version(spec.version)


def te_range_of_installed_megatron_core() -> SpecifierSet:
    """The TE range that the installed megatron-core declares (any extra), intersected."""
    spec = SpecifierSet()
    named = False
    for line in metadata.requires("megatron-core") or []:
        req = Requirement(line)
        if canonicalize_name(req.name) == "transformer-engine":
            spec &= req.specifier
            named = True
    assert named, "the installed megatron-core's metadata names no transformer-engine at all"
    return spec


def test_te_pin_inside_the_installed_megatron_core_range():
    reqs = _requirements(REQ_GPU)
    te = _pinned(reqs, "transformer-engine")
    spec = te_range_of_installed_megatron_core()
    mcore = metadata.version("megatron-core")
    assert spec.contains(te, prereleases=True), (
        f"requirements-gpu.txt pins transformer-engine {te}, outside megatron-core {mcore}'s "
        f"declared range {spec}")
    if mcore == "0.16.1":  # the release requirements-gpu.txt pins: its range is a real bound
        assert str(spec) and _pinned(reqs, "megatron-core") == Version(mcore)
        assert not spec.contains("2.8.0") and not spec.contains("2.12.0"), spec
    assert not [r for r in reqs if canonicalize_name(r.name) in ("torch", "numpy")], (
        "requirements-gpu.txt must not name torch or numpy: the machine's stay")


# --------------------------------------------------------------------------- the dry run
def _wheel(folder: Path, name: str, version: str, requires=(), extras=()) -> None:
    """A stand-in wheel: metadata only (pip reads nothing else in a dry run)."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Provides-Extra: {e}" for e in extras]
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """(python of an env with only a stand-in CUDA torch installed, folder of stand-in wheels)."""
    root = tmp_path_factory.mktemp("gpu-install")
    env = root / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    info = site / f"torch-{INSTALLED_TORCH}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: "
                                   f"{INSTALLED_TORCH}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")

    wheels = root / "wheels"
    wheels.mkdir()
    reqs = _requirements(REQ_GPU)
    te = str(_pinned(reqs, "transformer-engine"))
    mcore = str(_pinned(reqs, "megatron-core"))
    for r in reqs:  # every pinned line of requirements-gpu.txt is offered
        name = canonicalize_name(r.name)
        if name in ("megatron-core", "transformer-engine"):
            continue
        _wheel(wheels, r.name, str(_pinned(reqs, r.name)))
    _wheel(wheels, "megatron-core", mcore, requires=["torch>=2.6.0", "numpy", "packaging"])
    _wheel(wheels, "transformer-engine", te, extras=["pytorch"],
           requires=[f'transformer_engine_torch=={te}; extra == "pytorch"'])
    _wheel(wheels, "transformer-engine-torch", te, requires=["torch", "numpy"])
    for name, version in (("numpy", "2.4.6"), ("packaging", "25.0"), ("torch", "2.13.0"),
                          ("torch", "99.0.0")):  # a newer torch for pip to be tempted by
        _wheel(wheels, name, version)
    return py, wheels, root


def _constraints(py: Path, root: Path) -> Path:
    out = subprocess.run(["bash", str(PREPARE), "constraints"], env={"PYTHON": str(py),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"torch=={INSTALLED_TORCH}"], out.stdout
    path = root / "constraints.txt"
    path.write_text(out.stdout)
    return path


def _hermetic_env() -> dict:
    """No pip configuration of this machine (its constraints, indexes, find-links)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _dry_run(py: Path, wheels: Path, root: Path, *extra) -> dict:
    report = root / "report.json"
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--quiet",
           "--no-index", "--find-links", str(wheels), "--report", str(report),
           "-r", str(REQ_GPU), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_hermetic_env())
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}


@pytest.mark.timeout(300)
def test_gpu_install_keeps_the_machines_torch(machine):
    py, wheels, root = machine
    reqs = _requirements(REQ_GPU)
    constraints = _constraints(py, root)
    for extra in ([], ["--upgrade", "--upgrade-strategy", "eager"]):
        plan = _dry_run(py, wheels, root, "-c", str(constraints), *extra)
        assert "torch" not in plan, f"the GPU install would replace torch {INSTALLED_TORCH}: {plan}"
        assert plan["megatron-core"] == str(_pinned(reqs, "megatron-core")), plan
        assert plan["transformer-engine"] == str(_pinned(reqs, "transformer-engine")), plan
        assert plan["transformer-engine-torch"] == plan["transformer-engine"], plan
    # the control: the same eager upgrade without the constraints replaces torch
    plan = _dry_run(py, wheels, root, "--upgrade", "--upgrade-strategy", "eager")
    assert plan.get("torch") == "99.0.0", plan


def test_prepare_script_usage_and_syntax():
    assert subprocess.run(["bash", "-n", str(PREPARE)]).returncode == 0
    out = subprocess.run(["bash", str(PREPARE), "--help"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "constraints" in out.stdout and "--find-links" in out.stdout
    bad = subprocess.run(["bash", str(PREPARE), "frobnicate"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "gpu_prepare.sh: unknown command 'frobnicate': constraints | install [--find-links DIR] "
        "| download DIR [PYVER]"]
