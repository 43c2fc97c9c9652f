"""benchmarks/gpu_check.py on CPU: the code paths the GPU day runs, inside a budget, every planned cell a row.

The full run is ``--device cpu --preset tiny`` as a subprocess with README's 180 s budget; it must finish in under
80% of it (about a minute on an idle 2-core machine, two when other jobs share the cores), and on CPU tiny no cell
is cut by design, so every planned cell must end as a row: a train row per paradigm x mode, the FSDP-config fit and
the predict that reloads its checkpoint, and a decode row at batch 1 and 16 for every paradigm and strategy. If this
machine cannot fit it, the tiny workload is to be shrunk, not these checks. ``--_oom_above 2`` makes every batch
above 2 rows raise an out-of-memory error, so the halving a GPU may need runs here too (4 -> 2). A second run with a
12 s budget checks that a part killed at its cap reports its cells as cut and that the total stays inside the budget.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
SLACK_S = 10  # interpreter start before the script's clock, and process exit
BUDGET_S = 180  # README's CPU command
ROOM = 0.8  # "inside its budget with room to spare": elapsed under this share of the budget
DESIGNED_CUTS: dict[str, set] = {"train": set(), "fsdp": set(), "decode": set()}  # none on CPU tiny


def run_check(out: Path, budget: float, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--budget",
                           str(budget), "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=budget + 120)
    return proc, time.perf_counter() - t0


def accounted(res: dict) -> set:
    return {r["cell"] for r in res["rows"] + res["cut"] + res["errors"]}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc, seconds = run_check(out, BUDGET_S, "--train_batch", "4", "--_oom_above", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(out=out, proc=proc, seconds=seconds, budget=BUDGET_S,
                report=json.loads((out / "gpu_check.json").read_text()))


def rows_by_cell(full, part: str) -> dict:
    """The part's rows by cell, after checking that every planned cell has one (a cut only where designed)."""
    res = full["report"]["parts"][part]
    assert res["errors"] == [], res["errors"]
    unplanned = {c["cell"]: c["reason"] for c in res["cut"] if c["cell"] not in DESIGNED_CUTS[part]}
    assert unplanned == {}, f"{part}: cut on CPU tiny (shrink the tiny workload): {unplanned}"
    rows = {r["cell"]: r for r in res["rows"]}
    assert set(res["plan"]) - {"warm-up"} == set(rows) | DESIGNED_CUTS[part], res["plan"]
    return rows


def test_total_time_well_inside_the_budget(full):
    assert full["report"]["elapsed_s"] < ROOM * full["budget"], full["report"]["elapsed_s"]
    assert full["seconds"] <= full["budget"] + SLACK_S, full["seconds"]


def test_json_structure(full):
    r = full["report"]
    assert set(r) >= {"env", "args", "budget_s", "elapsed_s", "parts", "decode_source"}
    assert set(r["env"]) >= {"date", "device_name", "device_count", "torch", "lightning", "peak_tflops"}
    assert r["env"]["device_name"].startswith("CPU") and r["env"]["peak_tflops"] is None
    assert list(r["parts"]) == ["fsdp", "decode", "train"]  # gpu_check.PARTS, the run order
    for part, res in r["parts"].items():
        assert set(res) >= {"rows", "cut", "errors", "notes", "plan", "status", "cap_s", "seconds"}, part
        assert res["status"] == "ok", (part, res["cut"], res["errors"])
        assert res["seconds"] <= res["cap_s"] + 1, part
    for name in ("train", "decode"):  # the CPU benchmarks' file shape
        shaped = json.loads((full["out"] / f"{name}.json").read_text())
        assert set(shaped) >= {"args", "device", "rows"} and shaped["rows"] == r["parts"][name]["rows"]


def test_train_part_has_a_row_per_paradigm_and_mode(full):
    from nanollada.lm import LM_CLASSES
    res = full["report"]["parts"]["train"]
    assert res["plan"] == [f"{p} {m}" for m in ("eager", "compile") for p in LM_CLASSES]
    rows = rows_by_cell(full, "train")
    for cell, row in rows.items():
        paradigm, mode = cell.split()
        assert row["paradigm"] == paradigm and row["lm_class"] == LM_CLASSES[paradigm].__name__
        assert row["compile"] == (mode == "compile")
        assert row["compile_backend"] == ("aot_eager" if mode == "compile" else None)  # CPU: no inductor codegen
        assert row["batch"] == 2 and row["oom_halved_from"] == [4]  # the simulated OOM halved 4 -> 2
        assert positive(row["tok_s"]) and positive(row["tflops"]) and positive(row["step_ms"])
        assert row["mfu"] is None and row["peak_mem_gib"] is None
        assert row["precision"] == "32-true" and row["steps"] >= 1
    from nanollada.model import ModelConfig
    from nanollada.tokenizer import Tokenizer
    cfg = ModelConfig.from_preset("tiny", vocab_size=Tokenizer().vocab_size)
    for row in rows.values():  # Transformer.flops_per_token of what the module feeds: L, or x_t + x_0 = 2L positions
        L = row["seq_len"] * (2 if row["lm_class"] == "BlockDiffusionLM" else 1)
        per_position = 6 * row["params"] + 12 * cfg.n_layers * cfg.d_model * L
        assert row["flops_per_token"] == pytest.approx(per_position * L / row["seq_len"])


def test_fsdp_part_fits_and_predicts(full):
    res = full["report"]["parts"]["fsdp"]
    assert res["plan"] == ["fit", "predict"]
    assert any("single-device" in n for n in res["notes"])  # said, not hidden
    rows = rows_by_cell(full, "fsdp")
    fit, pred = rows["fit"], rows["predict"]
    assert fit["rc"] == 0 and fit["checkpoint_mb"] > 0 and Path(fit["checkpoint"]).exists()
    assert fit["steps"] == 2 and fit["devices"] == 1 and fit["strategy"].startswith("SingleDeviceStrategy")
    assert pred["rc"] == 0 and pred["checkpoint"] == fit["checkpoint"]  # predict reloaded the fit's checkpoint
    assert pred["tokens"] > 0 and isinstance(pred["completion"], str)
    cfg = Path(res["config"]).read_text()
    assert "max_steps: 2" in cfg and "strategy: auto" in cfg


def test_decode_part_has_a_row_per_paradigm_strategy_and_batch(full):
    from nanollada.lm import LM_CLASSES
    from nanollada.sampling.diffusion import STRATEGIES
    res = full["report"]["parts"]["decode"]
    methods = (["ar kv-cache", "ar no-cache"]
               + [f"diffusion {s} semi-AR {c}" for s in STRATEGIES for c in ("prefix-cache", "no-cache")]
               + [f"block_diffusion {s} semi-AR {c}" for s in STRATEGIES for c in ("kv-cache", "no-cache")])
    assert res["plan"] == ["warm-up"] + [f"{m} B={B}" for B in (1, 16) for m in methods]
    rows = rows_by_cell(full, "decode")
    assert {r["paradigm"] for r in rows.values()} == set(LM_CLASSES)
    for cell, row in rows.items():
        assert cell == f"{row['method']} B={row['batch']}" and row["batch"] in (1, 16)
        assert row["gen"] == row["generated"] == 8  # prompt 8, blocks of 4: every paradigm makes exactly 8
        assert positive(row["tok_s"]) and positive(row["seconds"]) and positive(row["fed_per_token"])
        assert row["tpf"] == pytest.approx(row["generated"] / row["forwards"]) and row["tpf"] >= 1
    assert "random weights" in full["report"]["decode_source"]


def test_markdown_printed_and_written(full):
    md = (full["out"] / "gpu_check.md").read_text()
    assert md in full["proc"].stdout
    assert md.startswith("# nanollada GPU check: ") and "torch " in md
    for header in ("| paradigm | compile | precision |", "| step | strategy | devices |", "| method | batch | gen |"):
        assert header in md
    assert md.index("## train") < md.index("## fsdp") < md.index("## decode")  # gpu_check.SHOW
    assert "| block_diffusion | aot_eager | 32-true |" in md
    assert "| block_diffusion threshold semi-AR kv-cache | 16 |" in md


def test_a_part_killed_at_its_cap_is_reported_cut(tmp_path):
    # An 8-second cap on the train part: its child cannot finish the six train cells (two of them compiled) in that,
    # so it is killed at the cap. The 60-second budget leaves the parent's own start-up (imports) room even on a
    # loaded machine, so the part always starts (a 12-second budget was sometimes gone before it could).
    budget = 60
    proc, seconds = run_check(tmp_path, budget, "--parts", "train", "--train_cap", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert seconds <= budget + SLACK_S and r["elapsed_s"] <= budget
    res = r["parts"]["train"]
    assert res["status"] == "cut" and res["killed"] and res["cut"], res
    assert res["seconds"] < 20, res  # killed at its cap, not left to run into the budget
    assert set(res["plan"]) <= accounted(res)
    assert "cut: " in proc.stdout


def test_peak_table():
    from gpu_check import peak_tflops
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA H200 NVL") == 835
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA L4") == 121
    assert peak_tflops("NVIDIA GeForce RTX 4090") == pytest.approx(165.2)
    assert peak_tflops("NVIDIA L40S") is None and peak_tflops("CPU x86_64") is None
    assert peak_tflops("NVIDIA L40S", 362.0) == 362.0
