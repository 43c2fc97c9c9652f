"""`nanollada export`: a trained checkpoint becomes model.safetensors + config.json + tokenizer.model, which
``load_exported`` turns back into the same model (bit-identical logits) without Lightning.

Two tiny checkpoints (AR and diffusion, 3 steps each) are trained by real ``python -m nanollada fit`` subprocesses,
started together, on a small generated corpus.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from conftest import CONFIGS, REPO, english_lines, finish, fit_config, start_cli, write_jsonl

BASES = {"ar": CONFIGS / "tiny" / "ar_pretrain.yaml", "diffusion": CONFIGS / "tiny" / "diffusion_pretrain.yaml"}
TRAINER = dict(max_steps=3, val_check_interval=1000, limit_val_batches=0, log_every_n_steps=1)
MODEL = dict(warmup_steps=1, lr=1e-2)  # a large step, so trained weights are far from the init


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    corpus = write_jsonl(work / "corpus.jsonl", [{"text": t} for t in english_lines(200, seed=5)])
    cache = work / "cache"
    cfgs = {p: fit_config(work / p, name=p, base=b, trainer=TRAINER, model=MODEL, data=dict(seq_len=32, batch_size=4),
                          checkpoint=dict(every_n_train_steps=3), train_files=[corpus], cache_dir=cache)
            for p, b in BASES.items()}
    from nanollada.data.cache import build_cache
    from nanollada.tokenizer import Tokenizer
    build_cache(str(corpus), "pretrain", Tokenizer(), str(cache),
                yaml.safe_load(cfgs["ar"].read_text())["data"]["val_fraction"], log=lambda *_: None)
    procs = {p: start_cli(["fit", "--config", c], cwd=c.parent) for p, c in cfgs.items()}
    out = {}
    for p, proc in procs.items():
        r = finish(proc, timeout=300)
        assert r.returncode == 0, f"{p} fit failed:\n{r.stderr[-4000:]}"
        out[p] = work / p / "checkpoints" / "last.ckpt"
        assert torch.load(out[p], weights_only=True)["global_step"] == 3
    return out


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """Each checkpoint exported through the command (in-process)."""
    from nanollada.cli import main
    out = {}
    for p, ckpt in ckpts.items():
        out[p] = tmp_path_factory.mktemp(f"exported_{p}")
        main(["export", "--ckpt", str(ckpt), "--output", str(out[p])])
    return out


def sample_ids(vocab: int, n: int = 2, T: int = 40) -> torch.Tensor:
    return torch.randint(7, vocab, (n, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("paradigm", list(BASES))
def test_exported_logits_equal_the_checkpoints(ckpts, exported, paradigm):
    from nanollada.export import load_exported
    from nanollada.lm import load_checkpoint
    from nanollada.model import document_attention_mask
    ref, exp = load_checkpoint(str(ckpts[paradigm])), load_exported(exported[paradigm])
    assert exp.paradigm == ref.paradigm == paradigm and exp.is_chat == ref.is_chat is False
    assert exp.model.cfg == ref.model.cfg and not exp.model.training
    assert exp.model.lm_head.weight is exp.model.embed.weight  # still tied: one tensor, as in training
    assert exp.tokenizer.fingerprint() == ref.tokenizer.fingerprint()
    ids = sample_ids(ref.model.cfg.vocab_size)
    docs = torch.tensor([[0] * 15 + [1] * 25, [0] * 40])
    with torch.no_grad():
        for mask in (None, document_attention_mask(docs, causal=False)):
            a, b = ref.model(ids, attn_mask=mask), exp.model(ids, attn_mask=mask)
            assert torch.equal(a, b)
    # the weights really are the trained ones, not a fresh init
    state = torch.load(ckpts[paradigm], weights_only=True)["state_dict"]
    for name, t in exp.model.state_dict().items():
        assert torch.equal(t, state["model." + name]), name


@pytest.mark.parametrize("paradigm", list(BASES))
def test_export_files(ckpts, exported, paradigm):
    from safetensors import safe_open
    d = exported[paradigm]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    payload = torch.load(ckpts[paradigm], weights_only=True)
    meta = payload["nanollada"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt" and f.metadata()["paradigm"] == paradigm
        embed = f.get_tensor("embed.weight")
    backbone = {k[len("model."):] for k in payload["state_dict"] if k.startswith("model.")}
    assert keys == backbone - {"lm_head.weight"}  # the tied head is stored once, as embed.weight
    assert not any(k.startswith(("forward_model", "rope_")) for k in keys)
    n_params = sum(torch.load(ckpts[paradigm], weights_only=True)["state_dict"]["model." + k].numel() for k in keys)
    assert (d / "model.safetensors").stat().st_size < 4 * n_params + 20_000  # fp32, nothing duplicated
    assert embed.dtype == torch.float32
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["paradigm"] == paradigm and cfg["data_kind"] == "pretrain" and cfg["tied_embeddings"] is True
    assert cfg["model_config"] == meta["model_config"] and cfg["model_config"]["causal"] == (paradigm == "ar")
    assert cfg["num_params"] == n_params and cfg["source"]["global_step"] == 3
    tok = cfg["tokenizer"]
    assert (tok["pad_id"], tok["unk_id"], tok["bos_id"], tok["eos_id"], tok["mask_id"], tok["im_start_id"],
            tok["im_end_id"]) == (0, 1, 2, 3, 4, 5, 6)
    assert tok["fingerprint"] == meta["tokenizer_fingerprint"] and tok["vocab_size"] == 8192
    assert (d / "tokenizer.model").read_bytes() == bytes(meta["tokenizer_model"].numpy().tobytes())


def test_load_exported_needs_no_lightning(exported, tmp_path):
    """In a fresh interpreter where importing lightning fails, load the export and compute logits. The package's
    ``__init__`` imports the Lightning modules, so the script registers a bare ``nanollada`` package (submodules
    importable, ``__init__`` not run): what remains is exactly the loader's own dependency closure."""
    from nanollada.export import load_exported
    ids = sample_ids(8192)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics",
                                          "jsonargparse", "tensorboard"):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType("nanollada"); pkg.__path__ = [{str(REPO / "nanollada")!r}]
        sys.modules["nanollada"] = pkg
        import torch
        from nanollada.export import load_exported
        m = load_exported({str(exported["ar"])!r})
        with torch.no_grad():
            torch.save(m.model(torch.load({str(tmp_path / "ids.pt")!r})), {str(tmp_path / "logits.pt")!r})
        bad = sorted(k for k in sys.modules if k.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not bad, bad
        print("ok", m.paradigm)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok ar" in r.stdout, r.stderr[-3000:]
    with torch.no_grad():
        want = load_exported(exported["ar"]).model(ids)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


@pytest.mark.parametrize("paradigm", list(BASES))
def test_exported_model_generates_like_the_checkpoint(ckpts, exported, paradigm):
    from nanollada.export import load_exported
    from nanollada.generate import GenerationSettings, generate_text
    from nanollada.lm import load_checkpoint
    settings = GenerationSettings(max_new_tokens=8, block_length=8, temperature=0.0)
    a = generate_text(load_checkpoint(str(ckpts[paradigm])), "the quick brown fox", settings)
    b = generate_text(load_exported(exported[paradigm]), "the quick brown fox", settings)
    assert a["completion"] == b["completion"] and a["forwards"] == b["forwards"]


def test_bf16_export(ckpts, tmp_path):
    from safetensors import safe_open
    from nanollada.export import export_checkpoint, load_exported
    out = export_checkpoint(ckpts["ar"], tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    full = load_exported(tmp_path / "bf16", dtype=torch.float32)
    assert full.model.embed.weight.dtype == torch.float32 and full.model.rope_cos.dtype == torch.float32
    half = load_exported(tmp_path / "bf16")
    assert half.model.embed.weight.dtype == torch.bfloat16
    from nanollada.lm import load_checkpoint
    ids = sample_ids(8192)
    with torch.no_grad():
        want = load_checkpoint(str(ckpts["ar"])).model(ids)
        torch.testing.assert_close(full.model(ids), want, atol=0.1, rtol=0.05)  # bf16 weights, fp32 compute


def test_export_errors(ckpts, exported, tmp_path, tiny_tokenizer_path, capsys):
    from nanollada.cli import main
    from nanollada.export import export_checkpoint, load_exported
    with pytest.raises(FileNotFoundError, match="missing"):
        load_exported(tmp_path)
    not_ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, not_ckpt)
    with pytest.raises(ValueError, match="not a nanollada checkpoint"):
        export_checkpoint(not_ckpt, tmp_path / "out")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out")])
    # a swapped tokenizer file is caught (ids would silently mean other pieces)
    bad = tmp_path / "swapped"
    bad.mkdir()
    for f in ("model.safetensors", "config.json"):
        (bad / f).write_bytes((exported["ar"] / f).read_bytes())
    from nanollada.tokenizer import Tokenizer
    (bad / "tokenizer.model").write_bytes(Tokenizer(tiny_tokenizer_path).model_bytes)
    with pytest.raises(ValueError, match="tokenizer"):
        load_exported(bad)
