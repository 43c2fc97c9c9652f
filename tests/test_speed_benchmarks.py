"""benchmarks/decode_speed.py, train_throughput.py and cache_agreement.py are driven by the registries: every
paradigm of ``LM_CLASSES`` (block diffusion included) appears in their output without edits, through its own
``Paradigm.decode`` / ``training_loss``, and the sampling strategies come from ``STRATEGIES``. Tiny, in-process."""

import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO, english_lines, write_jsonl
from nanollada.lm import LM_CLASSES
from nanollada.sampling.diffusion import STRATEGIES


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_speed") / "rows.json"
    load("decode_speed").main(["--preset", "tiny", "--batch-sizes", "1", "2", "--gen-lengths", "8", "--prompt-len",
                               "6", "--block-length", "4", "--strategies", "low_confidence", "threshold",
                               "--threads", "1", "--json", str(out)])
    return json.loads(out.read_text())


def test_decode_speed_methods_come_from_the_registries(decode_run):
    rows = decode_run["rows"]
    assert {r["paradigm"] for r in rows} == set(LM_CLASSES) >= {"ar", "diffusion", "block_diffusion"}
    names = list(dict.fromkeys(r["method"] for r in rows))
    # AR reads neither strategy nor layout: two methods; the diffusion paradigms: strategy x layout x cache
    assert names == (["ar kv-cache", "ar no-cache"]
                     + [f"diffusion {s} {lay} {c}" for s in ("low_confidence", "threshold")
                        for lay in ("semi-AR", "1-block") for c in ("prefix-cache", "no-cache")]
                     + [f"block_diffusion {s} {lay} {c}" for s in ("low_confidence", "threshold")
                        for lay in ("semi-AR", "1-block") for c in ("kv-cache", "no-cache")])
    assert len(rows) == 2 * len(names)
    for r in rows:
        assert r["tok_s"] > 0 and r["seconds"] > 0 and r["forwards"] >= 1 and r["fed_per_token"] > 0
        assert r["tpf"] == pytest.approx(r["generated"] / r["forwards"]) and r["tpf"] >= 1  # random weights: ~1
        if r["paradigm"] == "block_diffusion":  # prompt 6 + generation end on a block boundary
            block = 4 if "semi-AR" in r["method"] else 8
            assert r["generated"] == -(-(6 + 8) // block) * block - 6
        else:
            assert r["generated"] == 8
    by = {(r["method"], r["batch"]): r for r in rows}
    for B in (1, 2):  # the cache feeds fewer positions than recomputing the canvas / the sequence
        assert by["ar kv-cache", B]["fed_per_token"] < by["ar no-cache", B]["fed_per_token"]
        assert (by["diffusion threshold semi-AR prefix-cache", B]["fed_per_token"]
                < by["diffusion threshold semi-AR no-cache", B]["fed_per_token"])
        assert (by["block_diffusion threshold semi-AR kv-cache", B]["fed_per_token"]
                < by["block_diffusion threshold semi-AR no-cache", B]["fed_per_token"])
    assert decode_run["source"].startswith("random-init tiny")


def test_decode_speed_tables(decode_run):
    ds = load("decode_speed")
    md = ds.table(decode_run["rows"])
    assert md.startswith("| method | batch | gen | forwards |")
    assert "| block_diffusion threshold semi-AR kv-cache |" in md
    cache = ds.cache_table(decode_run["rows"])
    assert "| ar kv-cache | 1 | 8 |" in cache and "| block_diffusion low_confidence 1-block kv-cache | 2 | 8 |" in cache
    assert cache.count("\n") - 1 == 2 * (1 + 4 + 4)  # every cached method at both batch sizes


def test_fed_tokens_hook_matches_the_samplers_own_count(decode_run):
    """The forward hook's count equals what the diffusion samplers count themselves (``forward_tokens``)."""
    ds = load("decode_speed")
    from nanollada.tokenizer import Tokenizer
    args = type("A", (), dict(gen_lengths=[8], block_length=4, steps=None, threshold=0.9, commit_top_k=4, budget=None,
                              seed=0, strategies=["threshold"], layouts=["semi-AR"], only=None))()
    tok = Tokenizer(None)
    ifaces = ds.random_interfaces("tiny", tok, 64, torch.device("cpu"))
    prompt = torch.randint(7, tok.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for m in ds.methods(ifaces, args):
        if m.paradigm == "ar":
            continue
        row = ds.measure(m, ifaces[m.paradigm], prompt, 8, 1)
        out = ifaces[m.paradigm].decode(prompt.tolist(), m.settings(8), stop=False)
        assert row["fed_per_token"] * out.generated.numel() == out.forward_tokens, m.name


def test_train_throughput_runs_every_paradigm_through_its_own_loss(tmp_path):
    tt = load("train_throughput")
    out = tmp_path / "rows.json"
    tt.main(["--presets", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
             "--rounds", "1", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["paradigm"] for r in rows] == list(LM_CLASSES)  # the default: every registered paradigm
    for r in rows:
        assert r["lm_class"] == LM_CLASSES[r["paradigm"]].__name__
        assert r["lightning_tok_s"] > 0 and r["bare_tok_s"] > 0 and r["bare_gflops"] > 0
    from nanollada.model import ModelConfig
    from nanollada.tokenizer import Tokenizer
    cfg = ModelConfig.from_preset("tiny", vocab_size=Tokenizer().vocab_size)
    for r in rows:  # the module's own FLOPs count: L positions, or x_t + x_0 = 2L for block diffusion
        L = 16 * (2 if r["lm_class"] == "BlockDiffusionLM" else 1)
        per_position = 6 * r["params"] + 12 * cfg.n_layers * cfg.d_model * L
        assert r["flops_per_token"] == pytest.approx(per_position * L / 16)


@pytest.mark.parametrize("paradigm", list(LM_CLASSES))
def test_bare_loop_uses_the_modules_loss_outside_a_trainer(paradigm):
    """``without_trainer``: ``training_loss`` runs without Lightning (deterministic per step, the seeded noise of
    the Lightning path) and the module's trainer reference and ``log`` come back afterwards."""
    tt = load("train_throughput")
    from types import SimpleNamespace
    ns = SimpleNamespace(seed=0, seq_len=16, lr=3e-4, warmup=1, compile=False)
    lm = tt.build("tiny", paradigm, ns)
    batch = next(iter(tt.make_loader(lm, 2, 16, torch.device("cpu"))))
    if paradigm != "ar":  # the diffusion losses read trainer fields (accumulation, world size)
        with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
            lm.training_loss(batch, 0)
    with tt.without_trainer(lm) as stand_in:
        first = lm.training_loss(batch, 0)
        again = lm.training_loss(batch, 0)
        stand_in.global_step = 1
        later = lm.training_loss(batch, 1)
    assert torch.isfinite(first) and torch.equal(first, again)
    if paradigm != "ar":  # the diffusion noise is seeded by the step
        assert not torch.equal(first, later)
    assert lm._trainer is None and "log" not in vars(lm)


def test_cache_agreement_takes_any_registered_strategy(tmp_path, capsys):
    ca = load("cache_agreement")
    from nanollada.lm import MaskedDiffusionLM
    torch.manual_seed(0)
    m = MaskedDiffusionLM(preset="tiny", max_seq_len=64)
    ckpt = tmp_path / "diffusion.ckpt"
    torch.save({"state_dict": {k: v for k, v in m.state_dict().items() if k.startswith("model.")},
                "nanollada": {"paradigm": m.paradigm, "model_config": m.config.to_dict(),
                              "paradigm_config": m.paradigm_config(), "data_kind": "pretrain",
                              "tokenizer_model": torch.frombuffer(bytearray(m.tokenizer.model_bytes),
                                                                  dtype=torch.uint8)}}, ckpt)
    data = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in english_lines(600, words=20)])
    out = tmp_path / "agreement.json"
    ca.main(["--ckpt", str(ckpt), "--data", str(data), "--prompts", "2", "--prompt-len", "8", "--gen", "8",
             "--block-length", "4", "--strategy", "threshold_topk", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert [row["mode"] for row in r["rows"]] == ["full canvas (LLaDA)", "up to the current block",
                                                  "up to the current block + prefix cache"]
    assert r["rows"][0]["differ"] == 0 and all(row["tok_s"] > 0 for row in r["rows"])
    assert "| decoding (threshold_topk, blocks of 4, 2 prompts x 8 tokens)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the choices are the registry's
        ca.main(["--ckpt", str(ckpt), "--strategy", "bogus"])
    assert set(STRATEGIES) >= {"low_confidence", "threshold", "threshold_topk"}
