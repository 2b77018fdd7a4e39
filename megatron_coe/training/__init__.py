"""The training loop behind ``megatron_coe.train``.

    options.py     the option table (flags + YAML), parsing
    setup.py       process groups, model config, model/DDP, optimizer, LR schedule, layout checks
    data.py        datasets and resumable micro-batch iterators (real or --mock-data)
    trainer.py     the loop: schedules, eval, checkpoint/exit at step boundaries, signals
    checkpoint.py  dist_checkpointing save/load, atomic publish, compatibility checks
    metrics.py     progress lines, JSONL, TensorBoard, aux losses, expert load, FLOPs/MFU
    precision.py   fp32 / bf16 / FP8 options -> model-config fields + spec; FP8 device check
    signals.py     SIGTERM/SIGUSR1 flag, helper processes shielded from them
    timelimit.py   --exit-duration-in-mins / $COE_JOB_END_TIME deadline at step boundaries
    errors.py      SetupError (one-line user errors)
"""
