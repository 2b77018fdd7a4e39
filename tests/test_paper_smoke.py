"""Smoke version of the paper benchmark (``examples/paper/run_benchmark.py``) and of the routing
analysis (``tools/analyze_routing.py``): two tiny models, one seed, a few steps, on a slice of
GSM8K. The full benchmark (5 models x 3 seeds, ~1 h on 2 cores) is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
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
def test_benchmark_and_routing_analysis_smoke(gsm8k_small, tmp_path):
    """The benchmark command end to end (2 models, 1 seed, 4 steps, 1 process) -> table, CSV,
    plot, routing analysis; a second invocation skips the finished runs."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--scale", "cpu", "--models", "moe_8_16", "coe2_4_16", "--seeds", "1",
            "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--save-interval", "4", "--nproc", "1", "--ep", "1", "--test-samples", "16",
            "--train-data", gsm8k_small["train"], "--test-data", gsm8k_small["test"],
            "--out", out, "--work-dir", work]
    proc = _bench(args, timeout=240)
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
    again = _bench(args, timeout=120)
    assert again.stdout.count("done before, skipped") == 2
    assert "routing analysis" not in again.stdout
    assert time.time() - t0 < 60


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
