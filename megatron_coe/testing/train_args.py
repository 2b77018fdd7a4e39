"""Trainer command lines of tests, tools and benchmarks with every value they rely on written out.

The trainer takes Megatron-LM's defaults (issue 13): no sizes, dropout 0.1, the allgather
dispatcher, linear decay, no signal handler, validation only at the end, logs every 100 steps,
2 data workers. Runs written against the trainer's earlier defaults keep their behaviour with
``explicit(argv)``: it appends, for every option whose default changed, the value it used to have
(``PREVIOUS_DEFAULTS``), unless ``argv`` or its ``--config`` file already sets that option.
"""

from __future__ import annotations

from megatron_coe.training import options

# The trainer's defaults before it took Megatron-LM's (options whose default changed).
PREVIOUS_DEFAULTS = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_experts=8, seq_length=128,
    hidden_dropout=0.0, attention_dropout=0.0, moe_token_dispatcher_type="alltoall",
    micro_batch_size=2, global_batch_size=8, train_iters=100, lr=3e-4, lr_decay_style="cosine",
    exit_signal_handler=True, split="969,30,1", vocab_size=256, num_workers=0,
    eval_interval=1000, eval_iters=10, log_interval=10,
)


def given(argv: list) -> set:
    """Option names that ``argv`` (flags and its ``--config`` file) sets. Reads the flags
    without parsing their values, so command lines that test bad values work too."""
    by_flag = {}
    for name in options.OPTIONS:
        flag = options.flag_name(name)
        by_flag[flag] = name
        by_flag["--no-" + flag[2:]] = name
    names, argv = set(), [str(a) for a in argv]
    for i, token in enumerate(argv):
        flag = token.split("=", 1)[0]
        if flag in by_flag:
            names.add(by_flag[flag])
        elif flag == "--config":
            path = token.split("=", 1)[1] if "=" in token else argv[i + 1]
            try:
                names |= set(options.load_yaml(path))
            except options.OptionError:
                pass  # a test of a bad config file: the trainer reports it
    return names


def flags(values: dict) -> list:
    """``{option: value}`` as command-line flags."""
    out = []
    for name, value in values.items():
        flag = options.flag_name(name)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def explicit(argv: list, **overrides) -> list:
    """``argv`` plus the previous default of every changed option it does not set
    (``overrides`` replace those values)."""
    argv = [str(a) for a in argv]
    have = given(argv)
    if "train_samples" in have:  # sample-based training: no --train-iters
        have.add("train_iters")
    missing = {n: v for n, v in dict(PREVIOUS_DEFAULTS, **overrides).items() if n not in have}
    return argv + flags(missing)
