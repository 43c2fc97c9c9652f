"""benchmarks/gpu_check.py on CPU: the code paths the GPU day runs, inside a budget, every cell a row or a cut.

The full run is ``--device cpu --preset tiny`` as a subprocess with a 180 s budget (about a minute on an idle 2-core
machine; a loaded one may cut cells, which must then be reported). ``--_oom_above 2`` makes every batch above 2 rows
raise an out-of-memory error, so the halving a GPU may need runs here too (4 -> 2). A second run with a 12 s budget
checks that a part killed at its cap reports its cells as cut and that the total stays inside the budget.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
SLACK_S = 10  # interpreter start before the script's clock, and process exit


def run_check(out: Path, budget: float, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--budget",
                           str(budget), "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=budget + 120)
    return proc, time.perf_counter() - t0


def accounted(res: dict) -> set:
    return {r["cell"] for r in res["rows"] + res["cut"] + res["errors"]}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    budget = 180
    proc, seconds = run_check(out, budget, "--train_batch", "4", "--_oom_above", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(out=out, proc=proc, seconds=seconds, budget=budget,
                report=json.loads((out / "gpu_check.json").read_text()))


def test_total_time_inside_the_budget(full):
    assert full["report"]["elapsed_s"] <= full["budget"]
    assert full["seconds"] <= full["budget"] + SLACK_S, full["seconds"]


def test_json_structure(full):
    r = full["report"]
    assert set(r) >= {"env", "args", "budget_s", "elapsed_s", "parts", "decode_source"}
    assert set(r["env"]) >= {"date", "device_name", "device_count", "torch", "lightning", "peak_tflops"}
    assert r["env"]["device_name"].startswith("CPU") and r["env"]["peak_tflops"] is None
    assert set(r["parts"]) == {"train", "fsdp", "decode"}
    for part, res in r["parts"].items():
        assert set(res) >= {"rows", "cut", "errors", "notes", "plan", "status", "cap_s", "seconds"}, part
        assert res["status"] in ("ok", "cut"), (part, res["errors"])
        assert res["errors"] == [], (part, res["errors"])
        assert res["rows"] or res["cut"], part
        assert set(res["plan"]) <= accounted(res) | {"warm-up"}, part  # every planned cell: a row or a cut
        for c in res["cut"]:
            assert c["reason"], c
    for name in ("train", "decode"):  # the CPU benchmarks' file shape
        shaped = json.loads((full["out"] / f"{name}.json").read_text())
        assert set(shaped) >= {"args", "device", "rows"} and shaped["rows"] == r["parts"][name]["rows"]


def test_train_part_covers_every_paradigm_and_mode(full):
    from nanollada.lm import LM_CLASSES
    res = full["report"]["parts"]["train"]
    assert res["plan"] == [f"{p} {m}" for m in ("eager", "compile") for p in LM_CLASSES]
    for row in res["rows"]:
        assert row["paradigm"] in LM_CLASSES and row["lm_class"] == LM_CLASSES[row["paradigm"]].__name__
        assert row["batch"] == 2 and row["oom_halved_from"] == [4]  # the simulated OOM halved 4 -> 2
        assert row["tok_s"] > 0 and row["tflops"] > 0 and row["mfu"] is None and row["peak_mem_gib"] is None
        assert row["precision"] == "32-true" and row["steps"] >= 1
    from nanollada.model import ModelConfig
    from nanollada.tokenizer import Tokenizer
    cfg = ModelConfig.from_preset("tiny", vocab_size=Tokenizer().vocab_size)
    for row in res["rows"]:  # Transformer.flops_per_token of what the module feeds: L, or x_t + x_0 = 2L positions
        L = row["seq_len"] * (2 if LM_CLASSES[row["paradigm"]].__name__ == "BlockDiffusionLM" else 1)
        per_position = 6 * row["params"] + 12 * cfg.n_layers * cfg.d_model * L
        assert row["flops_per_token"] == pytest.approx(per_position * L / row["seq_len"])


def test_fsdp_part_fits_and_predicts(full):
    res = full["report"]["parts"]["fsdp"]
    assert res["plan"] == ["fit", "predict"]
    assert any("single-device" in n for n in res["notes"])  # said, not hidden
    rows = {r["step"]: r for r in res["rows"]}
    if "fit" in rows:
        assert rows["fit"]["rc"] == 0 and rows["fit"]["checkpoint_mb"] > 0
        assert Path(rows["fit"]["checkpoint"]).exists()
    if "predict" in rows:
        assert rows["predict"]["tokens"] > 0 and isinstance(rows["predict"]["completion"], str)
    cfg = Path(res["config"]).read_text()
    assert "max_steps: 2" in cfg and "strategy: auto" in cfg


def test_decode_part_covers_every_paradigm_and_strategy(full):
    from nanollada.lm import LM_CLASSES
    from nanollada.sampling.diffusion import STRATEGIES
    res = full["report"]["parts"]["decode"]
    methods = (["ar kv-cache", "ar no-cache"]
               + [f"diffusion {s} semi-AR {c}" for s in STRATEGIES for c in ("prefix-cache", "no-cache")]
               + [f"block_diffusion {s} semi-AR {c}" for s in STRATEGIES for c in ("kv-cache", "no-cache")])
    assert res["plan"] == ["warm-up"] + [f"{m} B={B}" for B in (1, 16) for m in methods]
    for row in res["rows"]:
        assert row["paradigm"] in LM_CLASSES
        assert row["tok_s"] > 0 and row["tpf"] == pytest.approx(row["generated"] / row["forwards"])
        assert row["batch"] in (1, 16) and row["gen"] == 16
    assert "random weights" in full["report"]["decode_source"]


def test_markdown_printed_and_written(full):
    md = (full["out"] / "gpu_check.md").read_text()
    assert md in full["proc"].stdout
    assert md.startswith("# nanollada GPU check: ") and "torch " in md
    for header in ("| paradigm | compile | precision |", "| step | strategy | devices |", "| method | batch | gen |"):
        assert header in md
    for part, res in full["report"]["parts"].items():
        for c in res["cut"]:
            assert f"cut: {c['cell']} (" in md


def test_a_part_killed_at_its_cap_is_reported_cut(tmp_path):
    budget = 12  # the train child cannot even finish importing and planning in this
    proc, seconds = run_check(tmp_path, budget, "--parts", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert seconds <= budget + SLACK_S and r["elapsed_s"] <= budget
    res = r["parts"]["train"]
    assert res["status"] == "cut" and res["killed"] and res["cut"], res
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
