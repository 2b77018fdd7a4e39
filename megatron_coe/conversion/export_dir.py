"""The Hugging Face export directory: what may be replaced, staging, atomic publish, manifest.

An export is written into a temporary sibling of ``--save`` (``.<name>.export-<host>-<pid>-*``,
same file system) and renamed into place only when complete, so a failed or interrupted export
leaves ``--save`` exactly as it was.

Ownership rule (decided here, documented in ``tools/convert_to_hf.py``):

* every export writes ``coe_export.json`` (``MANIFEST``), listing the files it wrote; a directory
  holding it is a *previous export* of this tool;
* ``--save`` may be missing or empty; a non-empty ``--save`` must be a previous export, unless
  ``overwrite`` (``--overwrite``);
* publishing replaces only (a) the files the previous export listed, (b) the files the new export
  writes, by name, and, (c) the Hugging Face weight files (``model*.safetensors``,
  ``pytorch_model*.bin`` and their ``.index.json``) that ``transformers`` would load instead of the
  new weights; everything else (``other_model.safetensors``, ``README.md``, sub-directories, ...)
  is kept, hard-linked (copied where linking fails) into the new directory;
* (b) and (c) files that the previous export did not write are replaced only with ``overwrite``;
  without it the export is refused before anything is written, naming them.

The published directory replaces the old one by ``renameat2(RENAME_EXCHANGE)`` (one atomic swap on
Linux) or, where that is unsupported, by two renames (old directory aside, new one in place). Files
are mode ``0666 & ~umask`` (0644 by default); the directory keeps the old one's mode.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

from megatron_coe.conversion.hf_config import ConversionError

MANIFEST = "coe_export.json"
TOOL = "megatron-coe convert_to_hf"
# files transformers loads as a model's weights (any of them can shadow the exported shards)
HF_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _tmp_prefix(save: str) -> str:
    return f".{os.path.basename(save)}.export-"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_manifest(save: str) -> Optional[dict]:
    """The manifest of a previous export in ``save``, or None (absent or not this tool's)."""
    path = os.path.join(save, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                              for n in files):
        return None
    return manifest


@dataclass
class ExportPlan:
    """Where and how an export is published (``plan_export``: checks only, writes nothing)."""

    save: str                       # the real path of --save
    overwrite: bool
    existing: List[str] = field(default_factory=list)   # entries of --save now
    ours: set = field(default_factory=set)              # files the previous export wrote
    notes: List[str] = field(default_factory=list)

    def replaced(self, new_names: Iterable[str]) -> List[str]:
        """Entries of --save that the publish replaces or removes."""
        new = set(new_names) | {MANIFEST}
        return sorted(n for n in self.existing if n in self.ours or n in new or HF_WEIGHTS.match(n)
                      or n == MANIFEST)

    def foreign(self, new_names: Iterable[str]) -> List[str]:
        """Entries replaced although the previous export did not write them."""
        return [n for n in self.replaced(new_names) if n not in self.ours and n != MANIFEST]


def plan_export(save: str, overwrite: bool = False, new_names: Iterable[str] = (),
                load: Optional[str] = None) -> ExportPlan:
    """Check ``save`` as an export target; raise ``ConversionError`` naming what to change.

    ``new_names``: the file names the export will write (weight shards aside, which are matched by
    ``HF_WEIGHTS``).
    """
    if not save:
        raise ConversionError("--save is empty: give the output directory")
    real = os.path.realpath(save)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConversionError(f"--save {save} is an existing file, not a directory: give a directory path")
    if load is not None:
        src = os.path.realpath(load)
        if src == real or src.startswith(real.rstrip(os.sep) + os.sep) or real.startswith(src + os.sep):
            raise ConversionError(f"--save {save} overlaps the checkpoint --load {load}: "
                                  "export into a separate directory")
    parent = os.path.dirname(real)
    probe = parent
    while not os.path.isdir(probe):
        nxt = os.path.dirname(probe)
        if nxt == probe:
            break
        probe = nxt
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConversionError(
            f"cannot write the export next to --save {save}: directory {probe} is not writable (the "
            "export is staged in a temporary directory beside --save and renamed into place)")
    plan = ExportPlan(save=real, overwrite=overwrite)
    if not os.path.isdir(real):
        return plan
    plan.existing = sorted(os.listdir(real))
    if not plan.existing:
        return plan
    manifest = read_manifest(real)
    if manifest is None and not overwrite:
        shown = ", ".join(plan.existing[:5]) + (", ..." if len(plan.existing) > 5 else "")
        raise ConversionError(
            f"--save {save} is not empty ({len(plan.existing)} entries: {shown}) and is not a previous "
            f"export of convert_to_hf (no {MANIFEST}): choose a new or empty directory, or pass "
            "--overwrite to replace the model files there (other files are kept)")
    if manifest is not None:
        plan.ours = set(manifest["files"])
    foreign = plan.foreign(new_names)
    if foreign and not overwrite:
        raise ConversionError(
            f"--save {save} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, not "
            "written by the previous export, which the new export would replace (or which transformers "
            "would load instead of it): move it away or pass --overwrite")
    if foreign:
        plan.notes.append(f"--overwrite: replacing {', '.join(foreign)} in {save} "
                          "(not written by convert_to_hf)")
    return plan


def remove_stale_staging(save: str) -> None:
    """Remove staging directories left by a killed export of this host (their pid is gone)."""
    parent, prefix = os.path.dirname(save), _tmp_prefix(save) + socket.gethostname() + "-"
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for name in entries:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def make_staging(plan: ExportPlan) -> str:
    parent = os.path.dirname(plan.save)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(plan.save)
    prefix = f"{_tmp_prefix(plan.save)}{socket.gethostname()}-{os.getpid()}-"
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def write_manifest(staging: str, names: Iterable[str], info: dict) -> None:
    manifest = {"tool": TOOL, "version": 1, "created_unix": int(time.time()), **info,
                "files": sorted(set(names) - {MANIFEST})}
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def _link_tree(src: str, dst: str) -> None:
    """``dst`` gets ``src`` (file, symlink or directory tree) by hard links, copies where that fails."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for name in os.listdir(src):
            _link_tree(os.path.join(src, name), os.path.join(dst, name))
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def finish_staging(plan: ExportPlan, staging: str, written: Iterable[str],
                   log: Callable[[str], None] = print) -> None:
    """Modes, kept entries, fsync: ``staging`` becomes the complete new directory."""
    written = set(written)
    mode = 0o666 & ~_umask()
    for name in written:
        path = os.path.join(staging, name)
        os.chmod(path, mode)
        _fsync(path)
    if os.path.isdir(plan.save):
        shutil.copymode(plan.save, staging)
    else:
        os.chmod(staging, 0o777 & ~_umask())
    replaced = set(plan.replaced(written))
    for name in plan.existing:
        if name not in replaced:
            _link_tree(os.path.join(plan.save, name), os.path.join(staging, name))
    for note in plan.notes:
        log(note)
    _fsync(staging, directory=True)


def publish(plan: ExportPlan, staging: str) -> None:
    """Put ``staging`` in place of ``plan.save``; the old directory (if any) is removed after."""
    save = plan.save
    parent = os.path.dirname(save)
    if not os.path.isdir(save):
        os.rename(staging, save)  # fails (and changes nothing) if --save appeared meanwhile
    elif not os.listdir(save):
        os.rename(staging, save)  # replaces the empty directory
    elif _exchange(staging, save):
        shutil.rmtree(staging)    # now the old directory (kept entries live on as hard links)
    else:
        aside = staging + ".old"
        os.rename(save, aside)
        try:
            os.rename(staging, save)
        except OSError:
            os.rename(aside, save)
            raise
        shutil.rmtree(aside)
    _fsync(parent, directory=True)


def discard(staging: Optional[str]) -> None:
    if staging and os.path.isdir(staging):
        shutil.rmtree(staging, ignore_errors=True)
