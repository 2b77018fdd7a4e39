"""Megatron-LM's defaults for every shared flag (issue 13).

* Every option of this trainer whose flag Megatron-LM's parser also has
  (``megatron.training.arguments.add_megatron_arguments``, shipped with megatron-core >= 0.17,
  i.e. the 0.19 environment) has Megatron-LM's default, except the documented ones
  (``options.MEGATRON_LM_DEFAULT_EXCEPTIONS``, each with its reason); an exception that no
  longer differs fails too, so the list stays exact.
* ``coe-train --help`` prints every option's default.
* Options without a Megatron-LM default are required, as there: one line naming them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_coe.training import options

ROOT = Path(__file__).resolve().parents[1]
HAVE_MEGATRON_LM = importlib.util.find_spec("megatron.training") is not None
NO_MEGATRON_LM = ("megatron.training (Megatron-LM's arguments) is not installed here: "
                  "megatron-core ships it from 0.17 on (the 0.19 environment, MCORE_ENV=019 "
                  "tools/run_tests.sh); this environment's megatron-core does not")


def _default(name: str):
    f = options.OPTIONS[name]
    return f.default_factory() if f.metadata["list_of"] is not None else f.default


def _unset(value) -> bool:
    return value is None or value is False or value == []


def _same(name: str, ours, theirs) -> bool:
    """Equal defaults: the same value, the same number (10000 == 10000.0), or both unset
    (None, False of a switch, an empty list). An unset tri-state switch of ours (None: decided
    from other options, e.g. --qk-layernorm) is not the same as Megatron-LM's False."""
    tri_state = ours is None and options.OPTIONS[name].metadata["type"] is bool
    if _unset(ours) and _unset(theirs) and not tri_state:
        return True
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) \
            and not isinstance(ours, bool) and not isinstance(theirs, bool):
        return float(ours) == float(theirs)
    return ours == theirs


@pytest.fixture(scope="module")
def megatron_lm_parser():
    if not HAVE_MEGATRON_LM:
        pytest.skip(NO_MEGATRON_LM)
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser())


def _shared(parser) -> dict:
    """{option: Megatron-LM's default} of the options whose flag Megatron-LM has."""
    actions = parser._option_string_actions
    out = {}
    for name in options.OPTIONS:
        flag = options.flag_name(name)
        for candidate in (flag, "--no-" + flag[2:]):
            if candidate in actions:
                out[name] = actions[candidate].default
                break
    return out


def test_every_shared_flag_has_megatron_lm_default(megatron_lm_parser):
    shared = _shared(megatron_lm_parser)
    assert len(shared) >= 100, sorted(shared)  # the table really was matched flag by flag
    differ = {n: (_default(n), theirs) for n, theirs in shared.items()
              if not _same(n, _default(n), theirs)}
    undocumented = {options.flag_name(n): v for n, v in differ.items()
                    if n not in options.MEGATRON_LM_DEFAULT_EXCEPTIONS}
    assert not undocumented, f"(ours, Megatron-LM's) defaults differ: {undocumented}"
    stale = sorted(options.flag_name(n) for n in options.MEGATRON_LM_DEFAULT_EXCEPTIONS
                   if n not in differ)
    assert not stale, f"documented as different but no longer different (or not shared): {stale}"


def test_required_options_are_those_megatron_lm_leaves_unset(megatron_lm_parser):
    shared = _shared(megatron_lm_parser)
    for name in options.REQUIRED:
        assert name in shared and shared[name] is None and _default(name) is None, name


def test_exceptions_are_documented_options():
    for name, why in options.MEGATRON_LM_DEFAULT_EXCEPTIONS.items():
        assert name in options.OPTIONS and len(why) > 30, name


def test_help_shows_every_default():
    parser = options.build_parser()
    actions = parser._option_string_actions
    missing = []
    for name in options.OPTIONS:
        if name.startswith("no_"):
            continue  # plain switches (--no-load-optim): off unless given
        default = None if _default(name) == [] else _default(name)
        if f"(default: {default})" not in actions[options.flag_name(name)].help:
            missing.append(options.flag_name(name))
    assert not missing, missing
    text = re.sub(r"\s+", " ", parser.format_help())
    for shown in ("Token dispatcher. (default: allgather)", "(default: linear)",
                  "Dropout on hidden states. (default: 0.1)", "(default: 100)"):
        assert shown in text


def test_missing_sizes_are_one_line_naming_the_flags():
    with pytest.raises(options.OptionError) as e:
        options.parse_args(["--hidden-size", "64"])
    msg = str(e.value)
    assert msg.startswith("missing required options: --num-layers --num-attention-heads "
                          "--num-experts --seq-length --micro-batch-size --train-iters --lr")
    assert "\n" not in msg and "--hidden-size" not in msg
    with pytest.raises(options.OptionError, match="--vocab-size"):
        options.parse_args("--num-layers 1 --hidden-size 8 --num-attention-heads 2 "
                           "--num-experts 2 --seq-length 8 --micro-batch-size 1 "
                           "--train-iters 1 --lr 1e-3 --mock-data".split())


@pytest.mark.timeout(60)
def test_cli_without_sizes_exits_2_with_one_line():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "megatron_coe.train", "--mock-data"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("coe-train: error: missing required options: --num-layers")


def test_megatron_lm_semantics_of_unset_values():
    argv = ("--num-layers 1 --hidden-size 8 --num-attention-heads 2 --num-experts 2 "
            "--seq-length 8 --micro-batch-size 2 --train-iters 3 --lr 1e-3 "
            "--data-path x").split()
    args = options.parse_args(argv)
    assert args.split == "969,30,1"  # Megatron-LM's legacy value for --data-path without --split
    assert args.global_batch_size is None and args.eval_interval is None
    assert (args.hidden_dropout, args.attention_dropout, args.moe_token_dispatcher_type,
            args.lr_decay_style, args.exit_signal_handler, args.eval_iters, args.log_interval,
            args.num_workers) == (0.1, 0.1, "allgather", "linear", False, 100, 100, 2)
