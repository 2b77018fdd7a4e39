#!/usr/bin/env python
"""``python -m megatron_coe.train`` plus MEASURED memory and parameter counts, one JSON per rank.

Used by ``run_benchmark.py`` as the training entry point (plain ``python`` for one process,
``torchrun ... examples/paper/train_measured.py`` for several); takes exactly the trainer's flags.
The trainer itself is unchanged: this file calls ``megatron_coe.train.main`` and observes it.

Written to ``$COE_MEASURE_DIR/rank_<RANK>.json`` when the trainer returns:

* ``rss_baseline_bytes``: resident set size after torch, Megatron-Core and the trainer modules are
  imported (the runtime, identical for every model variant), before anything is built;
* ``rss_peak_bytes``: the process's peak resident set size over its whole life (the kernel's
  high-water mark, ``getrusage(RUSAGE_SELF).ru_maxrss``), so no sampling gaps;
* ``rss_peak_above_baseline_bytes``: the difference: what the model, optimizer, activations,
  data indices and communication buffers of this run added on this rank;
* on a GPU, ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes``: torch's caching-allocator
  peaks for the whole run;
* parameter counts from the built model (``setup.build_model`` is wrapped to count them with
  ``setup.count_parameters``): ``params_local`` on this rank, and ``params_total`` /
  ``routed_expert_params_total`` for the whole model (every parameter once over all ranks).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(argv: list) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    out_dir = os.environ.get("COE_MEASURE_DIR")
    import megatron_coe.train as train_mod

    train_mod._quiet_known_warnings()  # Megatron's import-time notices about Apex / TE
    # Import what megatron_coe.train.main imports, so the baseline holds the whole runtime.
    import torch  # noqa: F401

    import megatron.core  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron_coe.training.trainer  # noqa: F401
    from megatron_coe.training import setup

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "rss_baseline_bytes": _rss()}
    original = setup.build_model

    def build_model(args, *rest, **kwargs):  # whatever else setup.build_model takes
        model = original(args, *rest, **kwargs)
        counts = setup.count_parameters(model)
        record.update(params_local=counts["local"], ep_size=args.expert_model_parallel_size,
                      params_total=counts["total"],
                      routed_expert_params_total=counts["routed_experts"])
        return model

    setup.build_model = build_model
    t0 = time.time()
    rc = train_mod.main(argv)
    record["wall_s"] = time.time() - t0
    record["rc"] = rc
    record["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["rss_peak_above_baseline_bytes"] = record["rss_peak_bytes"] - record["rss_baseline_bytes"]
    if torch.cuda.is_available():
        record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f"rank_{rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, f"rank_{rank}.json"))
    return rc


if __name__ == "__main__":  # required: dist_checkpointing spawns a process that imports __main__
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1:]))
