"""The README and docs/ say what is true (issue 21).

* every relative link (and its #anchor) and every repository path named in backticks in README.md
  and docs/*.md exists;
* every command in a ```bash block of the README is understood: the scripts parse (``bash -n``),
  each Python tool named answers ``--help`` with exit 0, ``python -c`` code compiles, the YAML a
  command names is a valid trainer config; a command of an unknown kind fails this test, so a new
  README command must be covered here;
* the README's non-training commands, copied as written, run in order against a tiny checkpoint
  made where the quickstart puts its run (``runs/quickstart/checkpoints``), in a scratch copy of
  the repository layout, and write what the README says they write;
* the tools, run with a Python without torch, stop with one line naming the environment;
* ``MCORE_ENV=016 bash tools/run_tests.sh`` sets up and runs that environment only (with
  stand-ins for the set-up script and the environment's Python) and asks pytest for the 15
  slowest tests.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
GENERATED = ("runs/", "hf/", "ckpt/", "data/processed/", ".venv", "outputs/")
LONG_RUNNING = ("examples/quickstart.sh", "tools/run_tests.sh")


def _env(**extra) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "PYTHONPATH"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------- links and paths
def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def _links(page: Path) -> list:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: {target} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading '#{anchor}' in {target.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def _named_paths(page: Path) -> set:
    """Repository paths named in backticks or code blocks: words with a slash whose first
    component is a top-level entry of the repository (generated outputs excepted)."""
    top = {p.name for p in ROOT.iterdir()} - {".git"}
    text = page.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = set()
    for word in " ".join(blocks + spans).split():
        word = word.strip("'\",;:()[]")
        if ("/" not in word or "..." in word or any(c in word for c in "*<>{}$=|")
                or word.startswith(GENERATED)):
            continue
        if word.split("/")[0] in top:
            found.add(word.rstrip("/"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(page):
    paths = _named_paths(page)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_docs_name_paths_at_all():  # the two checks above must have something to check
    assert len(_named_paths(README) | set().union(*map(_named_paths, DOCS))) >= 20
    assert sum(len(_links(p)) for p in PAGES) >= 40


# --------------------------------------------------------------------------- README commands
def readme_commands() -> list:
    """The README's ```bash blocks as commands: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for command in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def _tool(words: list):
    """``python tools/x.py ...`` -> ``tools/x.py``."""
    if words[0] in ("python", ".venv/bin/python") and len(words) > 1 and words[1].endswith(".py"):
        return words[1]
    return None


def _kind(words: list) -> str:
    if words[0] == "bash" and words[1] in LONG_RUNNING:
        return "script"
    if words[:2] == ["source", ".venv/bin/activate"]:
        return "activate"
    if words[0] == "tensorboard":
        return "tensorboard"
    if words[0] == "sbatch":
        return "sbatch"
    if _tool(words):
        return "tool"
    if words[0] == "python" and words[1] == "-c":
        return "python-c"
    raise AssertionError(f"README command of an unknown kind (cover it in tests/test_docs.py): "
                         f"{shlex.join(words)}")


def test_readme_commands_parse():
    commands = readme_commands()
    kinds = [_kind(w) for w in commands]
    assert {"script", "activate", "tensorboard", "sbatch", "tool", "python-c"} <= set(kinds), kinds
    bindir = Path(sys.executable).parent
    helped = set()
    for words, kind in zip(commands, kinds):
        if kind == "script":
            proc = subprocess.run(["bash", "-n", words[1]], cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, (words, proc.stderr)
        elif kind == "activate":
            assert (Path(sys.prefix) / "bin" / "activate").is_file()
        elif kind == "tensorboard":
            proc = subprocess.run([str(bindir / "tensorboard"), "--help"], capture_output=True,
                                  text=True, timeout=120, env=_env())
            assert proc.returncode == 0, proc.stderr[-2000:]
        elif kind == "sbatch":
            script = words[-1]
            proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, (words, proc.stderr)
            exports = dict(kv.split("=", 1) for w in words if w.startswith("--export=")
                           for kv in w[len("--export="):].split(",") if "=" in kv)
            from megatron_coe.training.options import parse_args

            args = parse_args(["--config", str(ROOT / exports["CONFIG"])])  # a valid config
            assert args.coe_iterations >= 1
        elif kind == "tool" and _tool(words) not in helped:
            helped.add(_tool(words))
            proc = subprocess.run([sys.executable, _tool(words), "--help"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120, env=_env())
            assert proc.returncode == 0 and "usage:" in proc.stdout, (words, proc.stderr[-2000:])
        elif kind == "python-c":
            compile(words[2], "<README python -c>", "exec")


@pytest.fixture(scope="module")
def quickstart_tree(tmp_path_factory):
    """A scratch copy of the repository layout with a tiny checkpoint where the quickstart puts
    its run, trained by the real trainer from the quickstart's config (2 steps, short sequences)."""
    from megatron_coe.testing.data import gsm8k_subset

    tree = tmp_path_factory.mktemp("readme")
    for name in ("tools", "megatron_coe", "examples", "data"):
        (tree / name).symlink_to(ROOT / name)
    (tree / ".venv").symlink_to(sys.prefix)  # the environment running this suite
    prefix = gsm8k_subset(tmp_path_factory.mktemp("gsm8k"), num_docs=120, vocab_size=320)
    run = tree / "runs" / "quickstart"
    cmd = [sys.executable, "-m", "megatron_coe.train", "--config", "examples/tiny/coe2_cpu.yaml",
           "--data-path", prefix, "--data-cache-path", str(tree / "cache"), "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
           "--split", "80,20,0", "--eval-iters", "1", "--eval-interval", "2", "--num-workers", "0",
           "--no-exit-signal-handler", "--save", str(run / "checkpoints"),
           "--load", str(run / "checkpoints"), "--tensorboard-dir", str(run / "tensorboard")]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=300, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return tree, out


def test_a_first_cpu_run_is_quiet(quickstart_tree):
    """One line about the GPU packages, none of Megatron-Core's warnings; an empty --load is
    information, not a warning."""
    _, out = quickstart_tree
    lines = out.splitlines()
    assert not [l for l in lines if "Apex are not installed" in l or "warnings.warn" in l], out
    assert len([l for l in lines if "Transformer Engine" in l]) == 1, out
    scratch = [l for l in lines if "from scratch" in l]
    assert len(scratch) == 1 and scratch[0].startswith("starting from scratch: --load "), scratch
    assert not [l for l in lines if l.startswith("warning:")], out


@pytest.mark.timeout(900)
@pytest.mark.one_env  # the commands do not depend on the release; the 0.16 environment runs them
def test_readme_non_training_commands_run_as_written(quickstart_tree):
    tree, _ = quickstart_tree
    env = _env(PATH=f"{tree / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
               VIRTUAL_ENV=str(tree / ".venv"))  # what `source .venv/bin/activate` does
    ran = []
    for words in readme_commands():
        if _kind(words) not in ("tool", "python-c"):
            continue
        proc = subprocess.run(words, cwd=tree, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, (shlex.join(words), (proc.stdout + proc.stderr)[-4000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        ran.append((words, proc.stdout))
    assert len(ran) >= 4, ran
    # what the README says each writes
    assert (tree / "runs/quickstart/routing/routing.md").is_file()
    assert (tree / "runs/quickstart/routing/routing.json").is_file()
    assert (tree / "hf/coe2-tiny/config.json").is_file()
    assert (tree / "hf/coe2-tiny/coe_export.json").is_file()
    assert (tree / "ckpt/coe2-tiny-ep2/latest_checkpointed_iteration.txt").is_file()
    generated = [out for words, out in ran if words[:2] == ["python", "-c"]]
    assert generated and generated[0].strip(), ran  # the decoded text


# --------------------------------------------------------------------------- set-up and guards
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))
# tools meant for another Python than the project's environment, which need no torch to start
NO_GUARD = {"gpu_acceptance.py": "tools/gpu_smoke.sh runs it with the GPU machine's Python; it "
                                 "says in one line when that Python has no CUDA"}


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_outside_the_environment_says_which_to_use(tool):
    """``-S``: no site-packages, so no torch, as with a system Python."""
    proc = subprocess.run([sys.executable, "-S", f"tools/{tool}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=_env())
    if tool in NO_GUARD:  # it starts without torch: its help, no traceback
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
        return
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    assert lines[0].startswith(f"{tool}: error: {sys.executable} has no torch"), lines[0]
    assert f".venv/bin/python tools/{tool} --help" in lines[0], lines[0]
    assert "source .venv/bin/activate" in lines[0], lines[0]


def test_run_tests_with_one_environment_sets_up_only_that_one(tmp_path):
    """tools/run_tests.sh with stand-ins: the set-up script and the environment's Python record
    how they were called."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "run_tests.sh").write_text((ROOT / "tools" / "run_tests.sh").read_text())
    log = tmp_path / "calls.log"
    (tmp_path / "tools" / "setup_env.sh").write_text(f'echo "setup $1" >> {log}\n')
    for venv in (".venv", ".venv-mcore019"):
        (tmp_path / venv / "bin").mkdir(parents=True)
        python = tmp_path / venv / "bin" / "python"
        python.write_text(
            "#!/usr/bin/env bash\n"
            f'if [ "$1" = -c ]; then echo "Python 3.x, torch t, megatron-core m"; exit 0; fi\n'
            f'echo "{venv} $* COE_TEST_ENVS=$COE_TEST_ENVS" >> {log}\n'
            'echo "3 passed in 0.01s"\n')
        python.chmod(0o755)
    proc = subprocess.run(["bash", "tools/run_tests.sh", "-k", "x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MCORE_ENV="016"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert calls == ["setup 016",
                     ".venv -m pytest -q -ra --durations=15 -k x COE_TEST_ENVS=016"], calls
    assert re.search(r"^\[tests\] environment 016: \d+ s wall$", proc.stdout, flags=re.M), proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "total: 3 passed, 0 failed, 0 skipped"
