"""Smoke version of the paper benchmark (``examples/paper/run_benchmark.py``) and of the routing
analysis (``tools/analyze_routing.py``): two tiny models, one seed, a few steps, on a slice of
GSM8K. The full benchmark (5 models x 3 seeds, ~1 h on 2 cores) is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_coe.analysis.routing import LayerRouting

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "examples/paper/run_benchmark.py"


def _env() -> dict:
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def gsm8k_small(tmp_path_factory) -> dict:
    """300 GSM8K train problems (512-token BPE) and 60 test problems with the same tokenizer."""
    from megatron_coe.data import preprocess as pp

    root = tmp_path_factory.mktemp("paper_gsm8k")
    out = {}
    for split, n in (("train", 300), ("test", 60)):
        src = root / f"{split}.jsonl"
        with gzip.open(ROOT / f"data/gsm8k/{split}.jsonl.gz", "rt") as f, open(src, "w") as g:
            for _, line in zip(range(n), f):
                g.write(line)
        prefix = str(root / f"gsm8k_{split}")
        kw = (dict(vocab_size=512) if split == "train"
              else dict(tokenizer_model=out["train"] + ".tokenizer.json"))
        pp.preprocess([str(src)], prefix, json_keys=["question", "answer"], log=lambda *a: None,
                      **kw)
        out[split] = prefix
    out["dir"] = root
    return out


def _bench(args: list, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


# --------------------------------------------------------------------------- unit: definitions
def _routing_map(sets: list, n: int) -> torch.Tensor:
    rm = torch.zeros(len(sets), n, dtype=torch.bool)
    for i, s in enumerate(sets):
        rm[i, list(s)] = True
    return rm


def test_routing_statistics_definitions():
    """Overlap, identical sets, chains, co-occurrence and the combinatorial spaces, by hand."""
    stats = LayerRouting(num_experts=6, topk=2, num_passes=2)
    pass1 = [(0, 1), (0, 1), (2, 3), (4, 5)]
    pass2 = [(0, 1), (1, 2), (4, 5), (4, 5)]
    stats.add(0, _routing_map(pass1, 6))
    stats.add(1, _routing_map(pass2, 6))
    s = stats.summary()
    assert s["tokens"] == 4
    assert s["load"][0] == [2, 2, 1, 1, 1, 1] and s["load"][1] == [1, 2, 1, 0, 2, 2]
    pair = s["pairs"][0]
    # |S1 ∩ S2| / k per token: 1, 1/2, 0, 1
    assert pair["overlap"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert pair["identical"] == pytest.approx(0.5)
    assert pair["overlap_random"] == pytest.approx(2 / 6)
    co = pair["cooccurrence"]
    assert co[0][0] == 1 and co[0][1] == 2 and co[1][2] == 1 and co[2][4] == 1 and co[4][4] == 1
    assert sum(map(sum, co)) == 4 * 2 * 2  # k x k pairs per token
    # chains: ((0,1),(0,1)) ((0,1),(1,2)) ((2,3),(4,5)) ((4,5),(4,5)) -> 4 distinct
    assert s["distinct_chains"] == 4 and s["chain_perplexity"] == pytest.approx(4.0)
    # unions: {0,1} {0,1,2} {2,3,4,5} {4,5}
    assert s["distinct_unions"] == 4
    assert s["chain_space"] == 15 ** 2 and s["moe_space"] == 15  # C(6,2)^2, C(6,4)
    assert s["passes"][1]["unused_experts"] == 1
    # the paper's CoE-2(4/64) vs MoE(8/64) space ratio under this definition
    big = LayerRouting(num_experts=64, topk=4, num_passes=2)
    big.add(0, _routing_map([(0, 1, 2, 3)], 64))
    big.add(1, _routing_map([(4, 5, 6, 7)], 64))
    assert big.summary()["chain_space_over_moe_space"] == pytest.approx(91.208, abs=1e-3)


def test_routing_rejects_dropped_tokens():
    stats = LayerRouting(num_experts=4, topk=2, num_passes=1)
    with pytest.raises(ValueError, match="top-k"):
        stats.add(0, _routing_map([(0,), (1, 2)], 4))


# --------------------------------------------------------------------------- smoke: end to end
@pytest.mark.timeout(1800)  # two benchmark invocations on a possibly loaded machine
@pytest.mark.one_env
def test_benchmark_and_routing_analysis_smoke(gsm8k_small, tmp_path):
    """The benchmark command end to end (2 models, 1 seed, 4 steps, 1 process) -> table, CSV,
    plot, routing analysis; a second invocation skips the finished runs."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--scale", "cpu", "--models", "moe_8_16", "coe2_4_16", "--seeds", "1",
            "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--save-interval", "4", "--nproc", "1", "--ep", "1", "--test-samples", "16",
            "--train-data", gsm8k_small["train"], "--test-data", gsm8k_small["test"],
            "--out", out, "--work-dir", work]
    t0 = time.time()
    proc = _bench(args, timeout=600)  # a hang guard, not a speed claim
    first = time.time() - t0  # the baseline of the resumed invocation's bound, measured here
    text = (out / "results.md").read_text()
    assert "| MoE(8/16) | 1 |" in text and "| CoE-2(4/16) | 1 |" in text
    assert text in proc.stdout  # the table printed is the table written
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"moe_8_16", "coe2_4_16"}
    for r in rows.values():
        assert 0 < float(r["final_valid_mean"]) < 10 and 0 < float(r["test_mean"]) < 10
        assert int(r["params_total"]) > 0 and float(r["rss_peak_above_baseline_mib"]) > 0
        assert float(r["tokens_per_s"]) > 0
    assert float(rows["moe_8_16"]["step_time_ratio"]) == pytest.approx(1.0)
    # same routed experts (16 x 2 layers), CoE has one more router per layer
    assert rows["moe_8_16"]["routed_expert_params_total"] == rows["coe2_4_16"]["routed_expert_params_total"]
    assert int(rows["coe2_4_16"]["params_total"]) == int(rows["moe_8_16"]["params_total"]) + 2 * 16 * 128
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 2 and all(r["test_loss"] for r in runs)
    png = (out / "valid_loss.png").read_bytes()  # matplotlib is pinned in requirements.txt
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    coe = json.loads((out / "routing/coe2_4_16_seed1/routing.json").read_text())
    assert coe["samples"] == 16 and coe["model"]["coe_iterations"] == 2
    for layer in coe["layers"].values():
        assert layer["tokens"] == 16 * 128
        assert len(layer["load"]) == 2 and all(sum(p) == 16 * 128 * 4 for p in layer["load"])
        assert 0.0 <= layer["pairs"][0]["overlap"] <= 1.0
        assert 1 <= layer["distinct_chains"] <= layer["tokens"]
        assert layer["chain_space"] == 1820 ** 2
    assert (out / "routing/coe2_4_16_seed1/routing.md").exists()
    assert (out / "routing/coe2_4_16_seed1/cooccurrence_heatmaps.png").exists()
    assert (out / "routing/moe_8_16_seed1/load_histograms.png").exists()
    moe = json.loads((out / "routing/moe_8_16_seed1/routing.json").read_text())
    assert "pairs" not in moe["layers"]["layer1"] and moe["model"]["coe_iterations"] == 1

    # resumable: finished runs and analyses are skipped
    t0 = time.time()
    again = _bench(args, timeout=600)
    assert again.stdout.count("done before, skipped") == 2
    assert "routing analysis" not in again.stdout
    assert time.time() - t0 < 2 * first  # it trained and analysed nothing again


@pytest.mark.slow
def test_full_cpu_benchmark(tmp_path):
    """The full CPU benchmark (5 models x 3 seeds, ~45-60 min on 2 cores)."""
    out = tmp_path / "out"
    _bench(["--scale", "cpu", "--out", out, "--work-dir", tmp_path / "work"], timeout=3 * 3600)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 5 and all(int(r["seeds"]) == 3 for r in rows)


def test_benchmark_model_variants_differ_only_in_routing_fields():
    """CPU configs: same model except experts / top-k / C / residuals / router sharing, with the
    paper's ratios (MoE top-8 = CoE 2 x top-4; 3N/4 experts); GPU configs are examples/*.yaml."""
    sys.path.insert(0, str(BENCH.parent))
    import run_benchmark as rb
    from megatron_coe.training.options import parse_args

    routing_fields = {"num_experts", "moe_router_topk", "coe_iterations", "coe_inner_residual",
                      "coe_outer_residual", "coe_shared_router"}
    want = {  # (N, k, C, inner, outer, shared)
        "moe_8_16": (16, 8, 1, False, True, False),
        "coe2_4_16": (16, 4, 2, True, False, False),
        "coe2_4_12": (12, 4, 2, True, False, False),
        "coe2_4_16_shared_router": (16, 4, 2, True, False, True),
        "coe2_4_16_outer_residual": (16, 4, 2, False, True, False),
    }
    parsed = {m: parse_args(["--config", str(cfg)]).to_dict()
              for m, (_, cfg) in rb.CPU_MODELS.items()}
    assert list(parsed) == list(want)
    for m, d in parsed.items():
        assert (d["num_experts"], d["moe_router_topk"], d["coe_iterations"], d["coe_inner_residual"],
                d["coe_outer_residual"], d["coe_shared_router"]) == want[m]
        assert {k: v for k, v in d.items() if k not in routing_fields} == \
            {k: v for k, v in parsed["moe_8_16"].items() if k not in routing_fields}
    for _, cfg in rb.GPU_MODELS.values():
        assert cfg.exists()


# --------------------------------------------------------------------------- protocol 2
def _protocol2():
    sys.path.insert(0, str(BENCH.parent))
    import protocol2

    return protocol2


def test_protocol2_arms_differ_only_in_their_fields():
    """Protocol 2: every trainer option is set by BASE (none left to the trainer's defaults);
    the committed configs are the generated ones; parsed by the trainer, each arm differs from
    BASE (= CoE-2(4/32)) exactly in the fields it declares, all of them routing fields (plus
    num_layers for the depth control), with the paper's ratios."""
    import dataclasses

    from megatron_coe.training.options import TrainArgs, parse_args

    p2 = _protocol2()
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    missing = names - set(p2.BASE) - p2.RUNTIME_OPTIONS
    assert not missing, (f"trainer option(s) {sorted(missing)} are not set by protocol 2: add "
                         "them to BASE in examples/paper/protocol2.py, then run it with "
                         "--write-configs")
    assert set(p2.BASE) <= names
    parsed = {}
    for arm in p2.ARMS:
        path = p2.CONFIG_DIR / f"{arm}.yaml"
        assert path.read_text() == p2.config_yaml(arm), f"{path} is stale: run --write-configs"
        parsed[arm] = parse_args(["--config", str(path)]).to_dict()
    base = parsed[p2.COE]
    want = {  # (N, k, C, inner, outer, shared, layers)
        "coe2_4_32": (32, 4, 2, True, False, False, 2),
        "moe_8_32": (32, 8, 1, True, False, False, 2),
        "megatron_moe_8_32": (32, 8, 1, False, True, False, 2),
        "coe2_4_24": (24, 4, 2, True, False, False, 2),
        "coe2_4_32_shared_router": (32, 4, 2, True, False, True, 2),
        "coe2_4_32_outer_residual": (32, 4, 2, False, True, False, 2),
        "moe_8_32_4layers": (32, 8, 1, True, False, False, 4),
    }
    assert list(parsed) == list(want)
    for arm, d in parsed.items():
        got = tuple(d[k] for k in p2.ROUTING_FIELDS[:6]) + (d["num_layers"],)
        assert got == want[arm], arm
        differ = {k for k in d if d[k] != base[k]}
        declared = {k for k, v in p2.ARMS[arm].fields.items() if p2.BASE[k] != v}
        assert differ == declared, (arm, differ, declared)
        allowed = set(p2.ROUTING_FIELDS) | ({"num_layers"} if arm == p2.DEPTH else set())
        assert differ <= allowed, (arm, differ - allowed)
    # the schedule the protocol relies on, as the trainer reads it
    assert (base["lr_decay_style"], base["lr_warmup_fraction"], base["train_iters"],
            base["eval_interval"], base["hidden_dropout"]) == ("constant", 0.1, 500, 25, 0.0)
    # equal routed compute: MoE top-8 = CoE 2 x top-4; memory-matched 3N/4
    assert parsed["moe_8_32"]["moe_router_topk"] == 2 * base["moe_router_topk"]
    assert parsed["coe2_4_24"]["num_experts"] * 4 == base["num_experts"] * 3


def test_protocol2_statistics_by_hand():
    """Paired interval, crossing step, step efficiency and the pre-written decision rules."""
    from megatron_coe.analysis import paired

    st = paired.paired_interval([-0.02, -0.04, -0.03, -0.05, -0.01])
    half = 2.776 * statistics.stdev([-0.02, -0.04, -0.03, -0.05, -0.01]) / 5 ** 0.5
    assert st["mean"] == pytest.approx(-0.03) and st["hi"] == pytest.approx(-0.03 + half)
    assert st["below_zero"] == 5
    assert paired.last_k_mean([[25, 9.0], [50, 3.0], [75, 2.0], [100, 1.0]], 3) == 2.0
    base = [[0, 5.0], [100, 4.0], [200, 3.0]]
    assert paired.crossing_step(base, 3.5) == pytest.approx(150.0)
    assert paired.crossing_step(base, 2.0) is None
    e = paired.step_efficiency([[100, 3.5]], base, 100)
    assert e["value"] == pytest.approx(1.5)
    e = paired.step_efficiency([[100, 2.0]], base, 100)
    assert e["value"] is None and e["lower_bound"] == pytest.approx(2.0)

    assert paired.decide([-0.02, -0.04, -0.03, -0.05, -0.01], 0.1, True)["verdict"] == "REPRODUCED"
    # one seed above 0: not reproduced-by-rule even with the mean below 0
    assert paired.decide([-0.02, -0.04, 0.001, -0.05, -0.01], 0.1, True)["verdict"] != "REPRODUCED"
    flat = [0.01, -0.005, 0.002, 0.004, -0.001]
    assert paired.decide(flat, 0.08, True)["verdict"] == "NOT REPRODUCED"
    d = paired.decide(flat, 0.01, True)  # depth does not help here: cannot say "not reproduced"
    assert d["verdict"] == "INCONCLUSIVE" and "depth" in d["reason"]
    d = paired.decide([-0.05, 0.02, -0.04, 0.01, -0.03], 0.1, True)
    assert d["verdict"] == "INCONCLUSIVE" and d["seeds_to_decide"] > 5
    assert str(d["seeds_to_decide"]) in d["reason"]
    assert paired.decide([-0.1, -0.1], 0.1, False)["verdict"] == "IN PROGRESS"
    assert paired.decide([-0.1], None, True)["verdict"] == "NO VERDICT"


@pytest.mark.timeout(600)
@pytest.mark.one_env
def test_protocol2_smoke(gsm8k_small, tmp_path):
    """Protocol 2 end to end on a GSM8K slice (2 arms, 1 rate, 1 seed, 4 steps, 1 process):
    stage 0 prints a planned wall time, the report and tables are written; a second invocation
    skips every finished run; --report-only after a run's summary is gone says IN PROGRESS and
    gives no verdict."""
    p2 = _protocol2()
    sizes = p2.split_sizes(gsm8k_small["train"], gsm8k_small["test"], 128, "98,2,0")
    gbs = 4
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--protocol", "2", "--arms", "coe2_4_32", "moe_8_32", "--lrs", "3e-3",
            "--seeds-main", "1", "--probe-iters", "2", "--test-samples", "8", "--nproc", "1",
            "--train-data", gsm8k_small["train"], "--test-data", gsm8k_small["test"],
            "--out", out, "--work-dir", work, "--set", "train_iters=4", "eval_interval=1",
            "save_interval=4", "micro_batch_size=2", f"global_batch_size={gbs}",
            f"eval_iters={sizes['valid_sequences'] // gbs}", "expert_model_parallel_size=1",
            "log_interval=1"]
    proc = _bench(args, timeout=400)  # ~50 s on an idle 2-core machine
    assert "stage 0: PLANNED WALL TIME" in proc.stdout
    text = (out / "results.md").read_text()
    assert text in proc.stdout and "COMPLETE" in text.splitlines()[0]
    assert "NO VERDICT" in text  # 1 seed planned: the rules need 5
    rows = {r["arm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"coe2_4_32", "moe_8_32"}
    for r in rows.values():
        assert r["seeds_done"] == "1" and 0 < float(r["test_mean"]) < 10
        assert int(r["params_total"]) > 0
    assert rows["coe2_4_32"]["routed_expert_params_total"] == rows["moe_8_32"]["routed_expert_params_total"]
    assert len(list(csv.DictReader(open(out / "runs.csv")))) == 2
    for png in ("paired_difference.png", "valid_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each run's config: the arm's config + seed / lr / paths, every option explicit
    cfg = (work / "runs/coe2_4_32_lr3e-3_seed1/config.yaml").read_text()
    assert "lr_decay_style: constant" in cfg and "seed: 1" in cfg

    # a partial report: one run's summary gone (as if it had been interrupted)
    (work / "summaries/moe_8_32_lr3e-3_seed1.json").unlink()
    assert p2.main([str(a) for a in args[2:]] + ["--report-only"]) == 0  # in this process
    text = (out / "results.md").read_text()
    assert "IN PROGRESS" in text.splitlines()[0] and "Verdict: IN PROGRESS" in text
    assert "1 of 2 planned runs finished" in text
    assert "| paper MoE(8/32) | - | 0/1 | in progress |" in text  # its rate: not chosen yet
    # resuming: the finished run is skipped, the other continues from its checkpoint (which
    # is at the last step: nothing to train) and the report is complete again
    again = _bench(args, timeout=180)
    assert "coe2_4_32_lr3e-3_seed1: finished before, skipped" in again.stdout
    assert "coe2_4_32_lr3e-3_seed1: training" not in again.stdout
    assert "moe_8_32_lr3e-3_seed1: training" in again.stdout
    assert "stage 0: coe2_4_32" not in again.stdout  # stage 0 is not measured twice
    assert "nothing to train" in (work / "runs/moe_8_32_lr3e-3_seed1/train.log").read_text()
    assert "COMPLETE" in (out / "results.md").read_text().splitlines()[0]


# --------------------------------------------------------------------------- protocol 3
def _protocol3():
    sys.path.insert(0, str(BENCH.parent))
    import protocol3

    return protocol3


def _curve(final: float, steps: int = 1000, every: int = 25) -> list:
    """A smooth synthetic validation curve ending at ``final``."""
    return [[i, final + 2.0 * (1 - i / steps) ** 2] for i in range(every, steps + 1, every)]


def test_protocol3_rules_by_hand():
    """score_at and protocol 3's verdicts on synthetic curves, each rule branch once."""
    from megatron_coe.analysis import paired

    p3 = _protocol3()
    c = [[25, 9.0], [50, 3.0], [75, 2.0], [100, 1.0], [125, 0.5]]
    assert paired.score_at(c, 100) == 2.0           # validations at 50, 75, 100
    assert paired.score_at(c, 110) is None          # no validation at 110: not reached
    assert paired.score_at([[25, 1.0]], 25) is None  # fewer than 3 points

    curves = {}
    offsets = [-0.05, -0.04, -0.06, -0.05, -0.045]
    for s, off in enumerate(offsets, 1):
        curves[p3.run_name(p3.MOE2, p3.LR, s)] = _curve(3.0 + 0.001 * s)
        curves[p3.run_name(p3.COE2, p3.LR, s)] = _curve(3.0 + 0.001 * s + off)
        curves[p3.run_name(p3.MOE4, p3.LR, s)] = _curve(2.9 + 0.001 * s)
        curves[p3.run_name(p3.COE4, p3.LR, s)] = _curve(2.9 + 0.001 * s + 0.04 * (-1) ** s)
    for s in range(1, 4):
        curves[p3.run_name(p3.INIT, p3.LR, s)] = _curve(3.0 + 0.001 * s + offsets[s - 1]
                                                         + 0.002 * (-1) ** s)
    v = p3.verdicts(curves)
    assert v["Q1@1000"]["verdict"] == "REPRODUCED" and v["Q1@500"]["verdict"] == "REPRODUCED"
    assert v["depth@1000"] == pytest.approx(0.1)
    assert v["Q2@1000"]["verdict"] == "INCONCLUSIVE"   # +-0.04: the interval reaches below -0.03
    assert v["Q3@1000"]["verdict"] == "NO EFFECT >= 0.02"
    assert v["lr_check"]["done"] is False and "not finished" in v["lr_check"]["text"]
    eff = v["efficiency"]["Q1@1000"]
    assert len(eff["values"]) + len(eff["lower_bounds"]) == 5  # CoE ahead: MoE never gets there
    # Q2 clearly not reproduced, but the LR check finds a better rate: inconclusive
    for s in range(1, 6):
        curves[p3.run_name(p3.COE4, p3.LR, s)] = _curve(2.9 + 0.001 * s + 0.005 + 0.001 * s)
    assert p3.verdicts(curves)["Q2@1000"]["verdict"] == "NOT REPRODUCED"
    ref500 = paired.score_at(curves[p3.run_name(p3.COE4, p3.LR, 1)], 500)
    for (arm, lr), delta in zip(p3.LR_CHECK, (0.0, -0.05)):
        curves[p3.run_name(arm, lr, 1)] = [[i, x + delta] for i, x in
                                           curves[p3.run_name(p3.COE4, p3.LR, 1)] if i <= 500]
    v = p3.verdicts(curves)
    assert v["lr_check"]["done"] and v["lr_check"]["flag"]
    assert v["lr_check"]["rows"][1]["score500"] == pytest.approx(ref500 - 0.05)
    assert v["Q2@1000"]["verdict"] == "INCONCLUSIVE" and "under-tuned" in v["Q2@1000"]["reason"]
    # a planned run missing: no verdict
    del curves[p3.run_name(p3.MOE2, p3.LR, 5)]
    assert p3.verdicts(curves)["Q1@1000"]["verdict"] == "IN PROGRESS"


def test_protocol3_arms_differ_only_in_their_fields():
    """Every arm is BASE (protocol 2's, at 1000 steps and lr 3e-3) with its declared fields; the
    committed configs are the generated ones; every trainer option is set."""
    import dataclasses

    from megatron_coe.training.options import TrainArgs, parse_args

    p2, p3 = _protocol2(), _protocol3()
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    assert not names - set(p3.BASE) - p2.RUNTIME_OPTIONS
    base = parse_args(["--config", str(p3.CONFIG_DIR / "coe2_4_32.yaml")]).to_dict()
    assert (base["train_iters"], base["lr"], base["lr_warmup_fraction"], base["lr_decay_style"],
            base["eval_interval"]) == (1000, 3e-3, 0.1, "constant", 25)
    for arm in p3.ARMS:
        path = p3.CONFIG_DIR / f"{arm}.yaml"
        assert path.read_text() == p3.config_yaml(arm), f"{path} is stale: run --write-configs"
        d = parse_args(["--config", str(path)]).to_dict()
        assert {k for k in d if d[k] != base[k]} == set(p3.ARMS[arm].fields), arm
    assert len(p3.RUNS) == 25 and len(set(p3.RUNS)) == 25


def test_protocol3_report_recomputes_from_committed_curves():
    """The committed results.csv of protocol 3 follows from the committed curves by the rules."""
    p3 = _protocol3()
    rows = list(csv.DictReader(open(p3.RESULTS_DIR / "results.csv")))
    v = p3.verdicts(p3.read_curves(p3.RESULTS_DIR / "curves"))
    assert len(rows) == 5
    for r in rows:
        dec = v[f"{r['question']}@{r['step']}"]
        assert r["verdict"] == dec["verdict"], r
        assert int(r["n"]) == dec["stats"]["n"]
        if dec["stats"]["mean"] is not None:
            assert float(r["d_mean"]) == pytest.approx(dec["stats"]["mean"], abs=1e-12)
    summaries = {p.stem for p in (p3.RESULTS_DIR / "runs").glob("*.json")}
    assert summaries == {p.stem for p in (p3.RESULTS_DIR / "curves").glob("*.csv")}


@pytest.mark.timeout(600)
@pytest.mark.one_env
def test_protocol3_smoke(gsm8k_small, tmp_path):
    """Protocol 3 end to end on a GSM8K slice (2 runs of 4 steps, 1 process): summaries and
    curves written where they are committed, the report IN PROGRESS with no verdict, a second
    invocation skips the finished runs."""
    p2, p3 = _protocol2(), _protocol3()
    sizes = p2.split_sizes(gsm8k_small["train"], gsm8k_small["test"], 128, "98,2,0")
    gbs = 4
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--protocol", "3", "--max-runs", "2", "--nproc", "1",
            "--train-data", gsm8k_small["train"], "--test-data", gsm8k_small["test"],
            "--out", out, "--work-dir", work, "--set", "train_iters=4", "eval_interval=1",
            "save_interval=4", "micro_batch_size=2", f"global_batch_size={gbs}",
            f"eval_iters={sizes['valid_sequences'] // gbs}", "expert_model_parallel_size=1",
            "log_interval=1"]
    proc = _bench(args, timeout=400)
    names = [p3.run_name(p3.COE2, p3.LR, 1), p3.run_name(p3.MOE2, p3.LR, 1)]
    for n in names:
        s = json.loads((out / "runs" / f"{n}.json").read_text())
        assert s["iterations"] == 4 and len(s["code_commit"]) == 40
        rows = list(csv.DictReader(open(out / "curves" / f"{n}.csv")))
        assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
        assert all(0 < float(r["valid_lm_loss"]) < 10 for r in rows)
    text = (out / "results.md").read_text()
    assert text.splitlines()[0].endswith("IN PROGRESS: 2 of 25 runs finished") and text in proc.stdout
    verdicts = [r["verdict"] for r in csv.DictReader(open(out / "results.csv"))]
    assert verdicts == ["IN PROGRESS"] * 5  # no verdict from 2 runs
    for png in ("paired_difference.png", "valid_loss_zoom.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _bench(args[:2] + ["--max-runs", "1"] + args[4:], timeout=300)
    for n in names:
        assert f"{n}: training" not in again.stdout
    assert f"{p3.run_name(p3.COE4, p3.LR, 1)}: training" in again.stdout
    assert "3 of 25 runs finished" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(8 * 3600)
def test_protocol3_full_run_reproduces_the_committed_curves(tmp_path):
    """The whole of protocol 3 (25 runs, about 4-5 h on 2 cores), re-trained from scratch: every
    validation curve equals the committed one and the report gives the committed verdicts."""
    p3 = _protocol3()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "protocol3.py"), "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=8 * 3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    fresh, committed = (p3.read_curves(d / "curves") for d in (out, p3.RESULTS_DIR))
    assert set(fresh) == set(committed)
    for run in committed:
        assert fresh[run] == pytest.approx(committed[run], abs=1e-6), run
    verdicts = lambda d: [(r["question"], r["step"], r["verdict"])  # noqa: E731
                          for r in csv.DictReader(open(d / "results.csv"))]
    assert verdicts(out) == verdicts(p3.RESULTS_DIR)


def test_gpu_scale_protocol_plan_and_refusal_on_cpu():
    """The paper-size protocol: estimates from the trainer's own FLOPs and parameter counts;
    the runs themselves refuse to start without a GPU (one line)."""
    sys.path.insert(0, str(BENCH.parent))
    import gpu_plan

    from megatron_coe.arch import ModelArch
    from megatron_coe.training.options import parse_args

    rows = {r["arm"]: r for r in map(gpu_plan.plan, gpu_plan.ARMS)}
    for arm, r in rows.items():
        a = ModelArch.from_args(parse_args(["--config", str(ROOT / f"examples/{arm}.yaml")]))
        assert r["params"] == a.num_parameters(gpu_plan.VOCAB)["total"]
        assert r["state_gib"] == pytest.approx(18 * r["params"] / 2 ** 30)
        assert r["tokens"] == 1000 * 64 * 512  # the paper's steps x batch x sequence
    # equal routed compute: CoE-2(4/64) adds a router and a shared-expert pass per layer only
    assert 1.0 < rows["coe2_4_64"]["flops"] / rows["moe_8_64"]["flops"] < 1.15
    assert rows["coe2_4_48"]["params"] < rows["coe2_4_64"]["params"]
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(BENCH), "--scale", "gpu"], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "needs" not in proc.stdout
        assert "runs only on a CUDA GPU" in lines[0] and "gpu_plan.py" in lines[0]


def test_results_page_numbers_follow_from_the_committed_csv():
    """RESULTS.md's protocol-2 verdict, depth gain and ablation orderings are recomputed from
    the committed per-run scores (results/protocol2/runs.csv) by the committed rules."""
    from megatron_coe.analysis import paired

    runs = list(csv.DictReader(open(BENCH.parent / "results/protocol2/runs.csv")))

    def scores(arm, lr=3e-3):
        return {int(r["seed"]): float(r["score"]) for r in runs
                if r["arm"] == arm and float(r["lr"]) == pytest.approx(lr)}

    def diff(a, b, lr_a=3e-3):
        sa, sb = scores(a, lr_a), scores(b)
        return paired.paired_interval([sa[s] - sb[s] for s in sorted(sa) if s in sb])

    page = (BENCH.parent / "RESULTS.md").read_text()
    main = diff("coe2_4_32", "moe_8_32")
    depth = -diff("moe_8_32_4layers", "moe_8_32")["mean"]
    dec = paired.decide(main["values"], depth, complete=True)
    assert dec["verdict"] == "NOT REPRODUCED" and "**NOT REPRODUCED**" in page
    assert f"+{main['mean']:.3f} [+{main['lo']:.3f}, +{main['hi']:.3f}]" in page
    assert f"| depth doubling gain (MoE) | 0.087 | {depth:.3f}" in page
    for a, b, lr_a in (("coe2_4_32_shared_router", "coe2_4_32", 3e-3),
                       ("coe2_4_24", "coe2_4_32", 3e-3),
                       ("coe2_4_32_outer_residual", "coe2_4_32", 3e-3),
                       ("megatron_moe_8_32", "moe_8_32", 1.5e-3)):
        st = diff(a, b, lr_a)
        assert f"{st['mean']:+.3f} [{st['lo']:+.3f}, {st['hi']:+.3f}]" in page, (a, st)


def test_results_page_protocol3_verdicts_follow_from_the_committed_curves():
    """RESULTS.md's protocol-3 verdict table and per-seed differences are the ones the rules
    give from the committed curves (a re-run changing a curve changes the page or fails here)."""
    p3 = _protocol3()
    page = (BENCH.parent / "RESULTS.md").read_text()
    v = p3.verdicts(p3.read_curves(p3.RESULTS_DIR / "curves"))
    for key in ("Q1@500", "Q1@1000", "Q2@500", "Q2@1000", "Q3@1000"):
        st, verdict = v[key]["stats"], v[key]["verdict"]
        ci = f"{st['mean']:+.3f} [{st['lo']:+.3f}, {st['hi']:+.3f}] ({st['n']} seeds)"
        rows = [ln for ln in page.splitlines() if ln.startswith("| ") and ci in ln]
        assert rows and all(f"**{verdict}**" in ln for ln in rows), (key, ci, verdict)
        if key.endswith("@1000"):
            per_seed = ", ".join(f"{x:+.3f}" for x in st["values"]).replace("-0.000", "+0.000")
            assert per_seed in page, (key, per_seed)


def test_protocol2_curves_are_the_committed_runs():
    """Protocol 2's regenerated curves (examples/paper/protocol2_curves.py): each committed curve
    gives, by the protocol's own score, the score committed in runs.csv when protocol 2 ran, and
    the check file says so; a curve that differs would be marked, never passed off as the run's."""
    from megatron_coe.analysis import paired

    sys.path.insert(0, str(BENCH.parent))
    import protocol2_curves as pc
    import protocol3 as p3

    committed = {r["run"]: r for r in csv.DictReader(open(pc.RESULTS_DIR / "runs.csv"))}
    curves = p3.read_curves(pc.CURVES_DIR) if pc.CURVES_DIR.exists() else {}
    check = pc.read_check()
    assert set(curves) == set(check) and set(curves) <= set(committed)
    for run, curve in curves.items():
        row = committed[run]
        score = paired.score_at(curve, int(row["iterations"]))
        assert score == pytest.approx(float(row["score"]), abs=1e-9), run
        assert check[run]["status"] == "equal", run
    # every run of protocol 2 has its curve (the regeneration trained the decision's runs first)
    order = [r["run"] for r in pc.committed_runs()]
    assert order[:3] == ["coe2_4_32_lr3e-3_seed1", "moe_8_32_lr3e-3_seed1",
                         "moe_8_32_4layers_lr3e-3_seed1"]
    assert sorted(curves) == sorted(order) == sorted(committed) and len(order) == 31


def test_protocol2_step_efficiency_follows_from_the_committed_curves():
    """Protocol 2's step-efficiency tables (results/protocol2/results.md, written by the command
    from curves it did not keep) are recomputed from the regenerated curves, cell by cell, and
    RESULTS.md's column carries the same means: the numbers a reader sees can be re-derived from
    the repository."""
    p2 = _protocol2()
    import protocol2_curves as pc
    import protocol3 as p3

    # (that every run's curve is committed: test_protocol2_curves_are_the_committed_runs)
    lr_of = pc.stage2_rates()
    runs_of = {a: [{"seed": seed, "valid_curve": c} for seed, c in sorted(by_seed.items())]
               for a, by_seed in pc.seed_runs(p3.read_curves(pc.CURVES_DIR)).items()}
    assert len(runs_of[p2.COE]) == 5 and len(runs_of[p2.STD]) == 3

    page = (pc.RESULTS_DIR / "results.md").read_text().splitlines()
    results = (BENCH.parent / "RESULTS.md").read_text().splitlines()
    checked = 0
    for base, blabel in ((p2.MOE, "paper MoE(8/32)"), (p2.STD, "standard MoE(8/32)")):
        start = next(i for i, ln in enumerate(page) if ln.startswith(f"Step efficiency vs the {blabel}"))
        for a in runs_of:
            if a == base:
                continue
            cells = [p2._eff(runs_of[a], runs_of[base], s) for s in p2.EFFICIENCY_STEPS]
            row = f"| {p2.ARMS[a].label} | " + " | ".join(cells) + " |"
            assert row in page[start:start + 12], (blabel, row)
            checked += 1
            if base == p2.MOE:   # RESULTS.md's table: the mean, or "not reached"
                means = " / ".join(m.group(1) if (m := re.match(r"(\d+\.\d\d) ", c))
                                   else "not reached" for c in cells)
                lr = {"0.003": "3e-3", "0.0015": "1.5e-3"}[lr_of[a]]
                mine = [ln for ln in results if ln.startswith(f"| {p2.ARMS[a].label} ({lr}) |")]
                assert len(mine) == 1 and mine[0].rstrip(" |").endswith(means), (a, means, mine)
    assert checked == 12


def test_protocol2_paired_band_follows_from_the_committed_curves(tmp_path):
    """The crossing RESULTS.md reads off protocol 2's paired-difference band (below 0 up to step
    175, above 0 from step 350, the decision's interval at 500) is what the committed curves
    give, and the figure is drawn from them."""
    from megatron_coe.analysis import paired

    p2 = _protocol2()
    import protocol2_curves as pc
    import protocol3 as p3

    arms = pc.seed_runs(p3.read_curves(pc.CURVES_DIR))
    per_step = {}
    for seed, c in arms[p2.COE].items():
        for i, x in pc.paired_score_difference(c, arms[p2.MOE][seed]).items():
            per_step.setdefault(i, []).append(x)
    band = {i: paired.paired_interval(xs) for i, xs in sorted(per_step.items())}
    assert all(st["n"] == 5 for st in band.values())
    last_below = max(i for i, st in band.items() if st["hi"] < 0)
    first_above_for_good = min(i for i in band if all(band[j]["lo"] > 0 for j in band if j >= i))
    assert (last_below, first_above_for_good) == (175, 350)
    assert all(st["hi"] < 0 for i, st in band.items() if i <= 175)
    st = band[500]
    page = (BENCH.parent / "RESULTS.md").read_text()
    assert "below 0 up to step 175 and above 0 from step 350" in page
    assert f"{st['mean']:+.4f} [{st['lo']:+.4f}, {st['hi']:+.4f}]" == "+0.0360 [+0.0116, +0.0603]"
    # matplotlib is in both test environments (requirements*.txt): no plots is a failure here
    written = pc.plots(p3.read_curves(pc.CURVES_DIR), tmp_path)
    assert [p.name for p in written] == ["paired_difference_ci.png", "valid_loss_zoom.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_protocol2_plots_only_refuses_missing_curves_in_one_line(tmp_path, capsys):
    """``protocol2_curves.py --plots-only`` from a directory that lacks a run's curve draws
    nothing and says in one line how many are missing and where; with every curve it draws."""
    import shutil

    _protocol2()  # examples/paper on the path
    import protocol2_curves as pc

    shutil.copytree(pc.CURVES_DIR, tmp_path / "curves")
    (tmp_path / "curves" / "moe_8_32_lr3e-3_seed4.csv").unlink()
    assert pc.main(["--plots-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 missing in" in err and "moe_8_32_lr3e-3_seed4.csv" in err
    assert not list(tmp_path.glob("*.png"))
    shutil.copy(pc.CURVES_DIR / "moe_8_32_lr3e-3_seed4.csv", tmp_path / "curves")
    assert pc.main(["--plots-only", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["paired_difference_ci.png",
                                                             "valid_loss_zoom.png"]
