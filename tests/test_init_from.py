"""``model.init_from`` is read when a fresh fit starts, never when the model is built: ``validate``, ``test`` and a
``--ckpt_path`` resume do not need the init checkpoint (it may have moved), and a fresh fit copies its weights into
the very tensors the optimizer holds."""

import lightning as L
import torch

from conftest import CONFIGS, DATA, check_ok, finish, fit_config, run_cli, start_cli
from nanollada.data.datamodule import LMDataModule
from nanollada.lm import ARLM


def init_checkpoint(path, max_seq_len=64, seed=123) -> ARLM:
    """A nanollada checkpoint of a seeded tiny AR model (the 'pretrained' weights)."""
    torch.manual_seed(seed)
    ar = ARLM(preset="tiny", max_seq_len=max_seq_len)
    torch.save({"state_dict": ar.state_dict(), "nanollada": {"paradigm": "ar", "tokenizer_fingerprint":
                                                             ar.tokenizer.fingerprint()}}, path)
    return ar


def test_building_the_model_does_not_read_init_from(tmp_path):
    model = ARLM(preset="tiny", max_seq_len=64, init_from=str(tmp_path / "not-there.ckpt"))
    assert model.init_report is None


def test_fresh_fit_copies_the_init_weights_into_the_optimizers_tensors(tmp_path, capsys):
    path = tmp_path / "init.ckpt"
    src = {k: v.clone() for k, v in init_checkpoint(path).model.state_dict().items()}
    torch.manual_seed(0)
    model = ARLM(preset="tiny", max_seq_len=64, init_from=str(path), lr=1e-3, warmup_steps=0, schedule="constant")
    assert not torch.equal(model.model.embed.weight, src["embed.weight"])  # another random init until fit starts
    data = LMDataModule([str(DATA / "pretrain.jsonl")], seq_len=32, batch_size=2, val_fraction=0.05,
                        cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert f"[nanollada] init_from {path} (ar): {len(src)} tensors matched" in capsys.readouterr().out
    assert set(model.init_report["matched"]) == set(src) and not model.init_report["missing"]
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.model.parameters()}
    for name, w in model.model.state_dict().items():
        # one Adam step of lr 1e-3 moves each weight by at most ~lr: the step acted on the loaded weights
        assert (w - src[name]).abs().max() < 1.2e-3, name
    assert not torch.equal(model.model.blocks[0].attn.wq.weight, src["blocks.0.attn.wq.weight"])


def test_validate_and_resume_do_not_need_the_init_checkpoint(tmp_path):
    init = tmp_path / "init.ckpt"
    init_checkpoint(init, max_seq_len=512)
    common = dict(base=CONFIGS / "tiny" / "ar_sft.yaml", train_files=[DATA / "sft.jsonl"], cache_dir=tmp_path / "cache",
                  ckpt_dir=tmp_path / "checkpoints", model=dict(init_from=str(init)),
                  data=dict(seq_len=64, batch_size=4, max_val_rows=4), checkpoint=dict(every_n_train_steps=3))
    trainer = dict(max_steps=3, val_check_interval=3, limit_val_batches=1.0, log_every_n_steps=1,
                   num_sanity_val_steps=0)
    cfg = fit_config(tmp_path, name="sft", trainer=trainer, **common)
    r = run_cli(["fit", "--config", cfg], cwd=tmp_path, threads=1)
    check_ok(r, "fresh fit")
    assert f"[nanollada] init_from {init} (ar):" in r.stdout and "tensors matched" in r.stdout
    init.rename(tmp_path / "moved.ckpt")  # the init checkpoint is gone from where the config says
    more = fit_config(tmp_path, name="sft_more", trainer={**trainer, "max_steps": 5}, **common)
    procs = {"validate": start_cli(["validate", "--config", cfg, "--ckpt_path", tmp_path / "checkpoints" / "last.ckpt"],
                                   cwd=tmp_path),
             "resume": start_cli(["fit", "--config", more, "--ckpt_path", "last"], cwd=tmp_path)}
    out = {k: finish(p, timeout=180) for k, p in procs.items()}
    for k, res in out.items():
        check_ok(res, k)
        assert "tensors matched" not in res.stdout, k
    assert "Restored all states" in out["resume"].stdout + out["resume"].stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
