"""Preference tuning (issue 13): the ``preference`` data kind, DPO for AR / masked / block diffusion (the loss, its
gradient, VRPO's shared noise), the variance measurement, a few CLI fit steps of every DPO config and the preference
family of ``nanollada eval``."""

import hashlib
import math

import pytest
import torch

from conftest import CONFIGS, DATA, check_ok, finish, fit_config, scalars, start_cli, write_jsonl
from nanollada.data.collate import IGNORE_INDEX, ARCollate, DiffusionCollate
from nanollada.data.preference import preference_documents, render_preference, truncate_pair
from nanollada.data.records import DataError
from nanollada.lm.dpo import ARDPO, BlockDiffusionDPO, MaskedDiffusionDPO, dpo_loss

LOG2 = math.log(2)
DPO_DATA = DATA / "dpo.jsonl"


def pair(user="What is 2 + 2?", chosen="It is 4.", rejected="Five, I think.", system=None, history=()) -> dict:
    prompt = ([{"role": "system", "content": system}] if system else []) + list(history) + \
        [{"role": "user", "content": user}]
    return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


def items_of(tok, records, max_len=None) -> list[dict]:
    out = []
    for rec in records:
        docs, _ = preference_documents(tok, rec, max_len)
        out.append({k: {"tokens": torch.tensor(ids), "loss_mask": torch.tensor(m)} for k, (ids, m) in
                    zip(("chosen", "rejected"), docs)})
    return out


# ---------------------------------------------------------------------------------------------- data
def test_prompt_is_the_shared_prefix_and_responses_the_last_turns(shipped_tokenizer):
    tok = shipped_tokenizer
    rec = pair(system="Be brief.", history=[{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}])
    prompt, chosen, rejected, cut = render_preference(tok, rec)
    newline = len(tok.encode("\n"))
    # prompt + response is the SFT rendering of each conversation without the template's final "\n"
    assert prompt + chosen == tok.render_chat(rec["chosen"])[0][:-newline]
    assert prompt + rejected == tok.render_chat(rec["rejected"])[0][:-newline]
    assert prompt == tok.render_chat(rec["chosen"][:-1], add_generation_prompt=True)[0] and prompt[0] == tok.bos_id
    assert chosen == tok.encode("It is 4.") + [tok.im_end_id] and not cut
    (ids, mask), _ = preference_documents(tok, rec)[0]
    assert [i for i, m in zip(ids, mask) if m] == chosen  # the earlier assistant turn ("Hello!") is prompt


def test_long_pairs_are_cut_with_the_prompt_shared():
    prompt, chosen, rejected = list(range(100)), list(range(200, 260)), list(range(300, 340))
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, 64)
    assert cut and p[0] == 0 and p[-1] == 99 and len(p) == 32  # bos + the prompt's end, half the room
    assert c == chosen[:32] and r == rejected[:32] and len(p) + len(c) == 64
    p, c, r, cut = truncate_pair(prompt[:10], chosen, rejected, 64)  # short prompt: kept whole
    assert p == prompt[:10] and c == chosen[:54] and r == rejected[:40] and cut
    assert truncate_pair(prompt[:10], chosen[:5], rejected, 64) == (prompt[:10], chosen[:5], rejected, False)


@pytest.mark.parametrize("bad, reason", [
    ({"chosen": pair()["chosen"], "rejected": pair(user="Other?")["rejected"]}, "do not share a prompt"),
    ({"chosen": pair()["chosen"] + [{"role": "user", "content": "?"}], "rejected": pair()["rejected"]},
     '"chosen" ends in a user turn'),
    ({"chosen": pair()["chosen"][-1:], "rejected": pair()["rejected"][-1:]}, "do not share a prompt"),
    ({"chosen": pair()["chosen"]}, 'missing non-empty list "rejected"'),
])
def test_bad_pairs_stop_with_file_and_line(tmp_path, shipped_tokenizer, bad, reason):
    from nanollada.data.cache import build_cache
    path = write_jsonl(tmp_path / "pref.jsonl", [pair(), bad])
    with pytest.raises(DataError, match=f"{path}:2: .*{reason}"):
        build_cache(str(path), "preference", shipped_tokenizer, str(tmp_path / "cache"), 0.125)


def test_preference_kind_splits_pairs_by_the_readme_rule_and_collates_per_paradigm(tmp_path):
    import json

    from nanollada.data.datamodule import LMDataModule
    records = [json.loads(line) for line in DPO_DATA.read_text().splitlines()]
    held_out = sum(hashlib.sha1(r["chosen"][0]["content"].encode()).hexdigest()[0] in "01" for r in records)
    dm = LMDataModule([str(DPO_DATA)], kind="preference", seq_len=96, batch_size=4, val_fraction=0.125,
                      cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.val_set), len(dm.train_set)) == (held_out, len(records) - held_out) == (28, 166)
    tok = dm.tokenizer
    items = [dm.train_set[i] for i in range(3)]
    ar = ARCollate("preference", tok.pad_id, tok.eos_id, 96)(items)
    dif = DiffusionCollate("preference", tok.pad_id, tok.eos_id, 96)(items)
    assert ar["pairs"] == dif["pairs"] == 3 and ar["input_ids"].shape[0] == dif["input_ids"].shape[0] == 6
    rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    for b, row in enumerate(rows):  # chosen rows first, then rejected; loss on the response only
        resp = row["tokens"][row["loss_mask"]].tolist()
        assert ar["targets"][b][ar["targets"][b] != IGNORE_INDEX].tolist() == resp
        assert dif["input_ids"][b][dif["eligible"][b]].tolist() == resp
        n = len(row["tokens"])
        assert (dif["doc_ids"][b, n:] == -1).all() and (dif["doc_ids"][b, :n] == 0).all()  # padding unseen
        assert len(row["tokens"]) <= 96 and row["tokens"][0] == tok.bos_id
    assert torch.equal(items[0]["chosen"]["tokens"][~items[0]["chosen"]["loss_mask"]],
                       items[0]["rejected"]["tokens"][~items[0]["rejected"]["loss_mask"]])  # one prompt


@pytest.mark.parametrize("cls, kind, files", [(ARDPO, "sft", [DATA / "sft.jsonl"]), (None, "preference", [DPO_DATA])])
def test_pairs_go_to_dpo_modules_only(tmp_path, cls, kind, files):
    import lightning as L

    from nanollada.data.datamodule import LMDataModule
    from nanollada.lm import ARLM
    model = (cls or ARLM)(preset="tiny", max_seq_len=64, schedule="constant")
    data = LMDataModule([str(f) for f in files], kind=kind, seq_len=32, batch_size=2, val_fraction=0.125,
                        cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="set data.kind: preference" if cls else "does not train on preference"):
        trainer.fit(model, data)


# ---------------------------------------------------------------------------------------------- the loss
def tiny(cls, **kw):
    torch.manual_seed(0)
    m = cls(preset="tiny", max_seq_len=128, **kw)
    m.reference.load_state_dict(m.model.state_dict())  # what a fresh fit does without reference_from
    return m


def batch_for(module, n_pairs=3, max_len=64) -> dict:
    import json
    tok = module.tokenizer
    recs = [json.loads(line) for line in DPO_DATA.read_text().splitlines()[:n_pairs]]
    return module.collate_cls("preference", tok.pad_id, tok.eos_id, max_len)(items_of(tok, recs, max_len))


@pytest.mark.parametrize("cls", [ARDPO, MaskedDiffusionDPO, BlockDiffusionDPO], ids=lambda c: c.__name__)
def test_loss_is_log2_at_the_reference_and_a_step_prefers_the_chosen(cls):
    """Policy == reference: every reward is 0, the loss log 2 (exactly for diffusion too: shared noise). One
    gradient step then raises the chosen-minus-rejected margin on the same draws (so the loss falls)."""
    kw = {} if cls is ARDPO else {"val_samples": 2, **({"block_size": 16} if cls is BlockDiffusionDPO else {})}
    m = tiny(cls, **kw)
    batch = batch_for(m)
    policy, reference, n = m.pair_logps(batch, 0, train=False)
    assert torch.equal(policy.detach(), reference)
    loss, stats = dpo_loss(policy, reference, m.hparams.beta)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7) and stats["reward_margin"] == 0
    assert (n > 0).all() and n.shape == policy.shape
    loss.backward()
    params = [p for p in m.model.parameters()]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    with torch.no_grad():  # a small step down the normalised gradient (first order: the loss falls)
        for p in params:
            p -= 1e-2 * p.grad / norm
    policy2, reference2, _ = m.pair_logps(batch, 0, train=False)
    assert torch.equal(reference2, reference)  # the reference is frozen and the draws repeat
    loss2, stats2 = dpo_loss(policy2, reference2, m.hparams.beta)
    assert stats2["reward_margin"] > 0 and loss2 < LOG2
    B = policy.shape[0] // 2
    gain = (policy2 - policy).detach()
    assert gain[:B].mean() > gain[B:].mean()  # chosen responses gained likelihood relative to rejected ones


def test_shared_noise_cancels_and_repeats(monkeypatch):
    m = tiny(MaskedDiffusionDPO, val_samples=2)
    batch = batch_for(m)
    with torch.no_grad():
        a = m.pair_logps(batch, 0, train=False)
        b = m.pair_logps(batch, 0, train=False)
        c = m.pair_logps(batch, 1, train=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed: same draws
    assert not torch.equal(a[0], c[0])  # another batch index: other draws
    assert torch.equal(a[0], a[1])  # policy == reference on shared draws: the difference is exactly 0
    monkeypatch.setitem(m.hparams, "shared_noise", False)
    with torch.no_grad():
        d = m.pair_logps(batch, 0, train=False)
    assert torch.equal(d[0], a[0]) and not torch.equal(d[0], d[1])  # the reference drew its own noise


def test_stratified_times_cover_the_unit_interval():
    m = tiny(MaskedDiffusionDPO)
    ids = torch.full((5, 40), 7)
    g = torch.Generator().manual_seed(0)
    noisy, masked, p_mask = m.draw_noise(ids, torch.ones_like(ids, dtype=torch.bool), 4, g)
    assert noisy.shape == masked.shape == (4, 5, 40) and p_mask.shape == (4, 5)
    t = (p_mask - 1e-3) / (1 - 1e-3)
    k = torch.arange(4)[:, None]
    assert ((t >= k / 4 - 1e-6) & (t <= (k + 1) / 4 + 1e-6)).all()  # draw k of every row in stratum k
    assert torch.allclose(t * 4 - k, (t * 4 - k)[:1].expand(4, 5))  # one u per row
    assert torch.equal(noisy == m.mask_id, masked)


def checkpoint(path, cls, seed=0, perturb=0.0, **kw):
    """A nanollada checkpoint of a seeded tiny backbone of ``cls``'s paradigm (what a SFT run would leave)."""
    torch.manual_seed(seed)
    m = cls(preset="tiny", max_seq_len=512, **kw)
    with torch.no_grad():
        for p in m.model.parameters():
            p += perturb * torch.randn_like(p)
    torch.save({"state_dict": {k: v for k, v in m.state_dict().items() if k.startswith("model.")},
                "nanollada": {"paradigm": m.paradigm, "model_config": m.config.to_dict(),
                              "paradigm_config": m.paradigm_config(), "data_kind": "sft",
                              "tokenizer_fingerprint": m.tokenizer.fingerprint(),
                              "tokenizer_model": torch.frombuffer(bytearray(m.tokenizer.model_bytes),
                                                                  dtype=torch.uint8)}}, path)
    return m


def test_variance_benchmark_shared_noise_removes_most_of_the_variance(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpo_variance", CONFIGS.parent / "benchmarks" / "dpo_variance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref, pol = tmp_path / "ref.ckpt", tmp_path / "pol.ckpt"
    checkpoint(ref, MaskedDiffusionDPO)
    checkpoint(pol, MaskedDiffusionDPO, perturb=0.01)
    args = ["--data", str(DPO_DATA), "--pairs", "4", "--samples", "2", "--repeats", "3", "--seq_len", "48"]
    r = bench.main(["--policy", str(pol), "--reference", str(ref), *args])
    assert r["pairs"] == 4 and r["paradigm"] == "diffusion"
    assert 0 < r["shared"]["var_logit"] < r["independent"]["var_logit"] / 10
    same = bench.main(["--policy", str(ref), "--reference", str(ref), *args])
    assert same["shared"]["var_logit"] == 0 and same["independent"]["var_logit"] > 0
    assert "independent / shared" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- fit via the CLI
DPO_CONFIGS = {"ar_dpo": ARDPO, "diffusion_dpo": MaskedDiffusionDPO, "block_diffusion_dpo": BlockDiffusionDPO}


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    """Three steps of every tiny DPO config through ``nanollada fit`` (two at a time), each from a seeded init
    checkpoint of its paradigm (the 'SFT model'), which becomes the reference."""
    work = tmp_path_factory.mktemp("dpo")
    runs, procs = {}, {}
    for name, cls in DPO_CONFIGS.items():
        init = work / f"{name}-init.ckpt"
        kw = {"block_size": 16} if cls is BlockDiffusionDPO else {}
        checkpoint(init, cls, seed=1, **kw)
        model = dict(init_from=str(init), warmup_steps=0, schedule="constant", lr=1e-3, **kw)
        if cls is not ARDPO:
            model.update(dpo_samples=2, val_samples=2)
        cfg = fit_config(work / name, name, base=CONFIGS / "tiny" / f"{name}.yaml", train_files=[DPO_DATA],
                         cache_dir=work / "cache", trainer=dict(max_steps=3, val_check_interval=3, log_every_n_steps=1,
                                                                limit_val_batches=2, num_sanity_val_steps=0),
                         model=model, data=dict(seq_len=64, batch_size=4), checkpoint=dict(every_n_train_steps=3))
        runs[name] = (work / name, init)
        procs[name] = cfg
    names = list(procs)
    results = {}
    for i in range(0, len(names), 2):  # two at a time on a 2-core box; the first builds the shared token cache
        started = {n: start_cli(["fit", "--config", procs[n]], cwd=work) for n in names[i: i + 2]}
        results.update({n: finish(p, timeout=300) for n, p in started.items()})
    return runs, results


@pytest.mark.parametrize("name", list(DPO_CONFIGS))
def test_dpo_config_fits_through_the_cli(dpo_runs, name):
    from nanollada.loading import backbone_state, load_checkpoint, read_checkpoint
    runs, results = dpo_runs
    (work, init), r = runs[name], results[name]
    check_ok(r, name)
    assert f"DPO reference = the policy at the start of the fit ({init})" in r.stdout
    log_dir = work / "logs" / name / "version_0"
    assert scalars(log_dir, "train/loss")[0] == pytest.approx(LOG2, abs=1e-6)  # policy == reference at step 0
    assert scalars(log_dir, "train/reward_accuracy")[0] == 0  # every reward is 0 there
    for tag in ("val/loss", "val/reward_accuracy", "val/reward_margin", "val/chosen_reward", "val/rejected_reward",
                "val/likelihood_accuracy"):
        (value,) = scalars(log_dir, tag).values()
        assert math.isfinite(value)
    assert list(scalars(log_dir, "val/pairs").values()) == [8.0]  # 2 batches of 4 pairs
    ck = read_checkpoint(str(work / "checkpoints" / "last.ckpt"))
    start = backbone_state(torch.load(init, weights_only=True)["state_dict"])
    ref = {k[len("reference."):]: v for k, v in ck["state_dict"].items() if k.startswith("reference.")}
    assert ref.keys() == start.keys() and all(torch.equal(ref[k], start[k]) for k in start)  # frozen = init_from
    policy = backbone_state(ck["state_dict"])
    assert not torch.equal(policy["embed.weight"], start["embed.weight"])  # the policy trained
    loaded = load_checkpoint(str(work / "checkpoints" / "last.ckpt"))  # inference sees a normal checkpoint
    assert loaded.paradigm == DPO_CONFIGS[name].paradigm and loaded.is_chat  # a preference-tuned chat model


# ---------------------------------------------------------------------------------------------- nanollada eval
class RecordingInterface:
    """A stand-in paradigm interface: fixed log-likelihoods per target, recording what it was asked."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def conditional_logprob(self, contexts, targets, s, groups=None):
        self.calls.append((contexts, targets, groups))
        lp = torch.tensor([self.scores[tuple(t)] for t in targets], dtype=torch.float64)
        return lp, torch.tensor([len(t) for t in targets])

    def estimate(self, family, s):
        return "stub"


def test_preference_family_is_detected_and_scored_through_the_interface(tmp_path, shipped_tokenizer):
    from types import SimpleNamespace

    from nanollada.evaluation.runner import EvalSettings, evaluate_task, format_markdown
    from nanollada.evaluation.tasks import load_task_file, resolve_task
    tok = shipped_tokenizer
    recs = [pair(chosen="Yes indeed, it is four.", rejected="No."), pair(user="Name a colour.", chosen="Blue.",
                                                                          rejected="A banana is not a colour.")]
    path = write_jsonl(tmp_path / "prefs.jsonl", recs)
    task = load_task_file(str(path))
    assert task.family == "preference" and task.chance == 0.5 and len(task.items) == 2
    targets = [render_preference(tok, r)[1:3] for r in recs]
    # pair 0: chosen better per token (-1/token vs -2/token) but worse in sum (longer); pair 1: rejected better
    scores = {tuple(targets[0][0]): -1.0 * len(targets[0][0]), tuple(targets[0][1]): -2.0 * len(targets[0][1]),
              tuple(targets[1][0]): -3.0 * len(targets[1][0]), tuple(targets[1][1]): -1.0 * len(targets[1][1])}
    assert scores[tuple(targets[0][0])] < scores[tuple(targets[0][1])]
    iface = RecordingInterface(scores)
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=512), parameters=lambda: iter([torch.zeros(1)]))
    loaded = SimpleNamespace(tokenizer=tok, interface=iface, model=model)
    r = evaluate_task(loaded, task, EvalSettings())
    assert (r["accuracy"], r["accuracy_sum"], r["chance"], r["truncated"]) == (0.5, 0.0, 0.5, 0)
    assert r["margin_per_token"] == pytest.approx(((-1 + 2) + (-3 + 1)) / 2)
    ((contexts, tgts, groups),) = iface.calls
    assert groups == [0, 0, 1, 1] and contexts[0] == contexts[1] == render_preference(tok, recs[0])[0]
    assert tgts == [targets[0][0], targets[0][1], targets[1][0], targets[1][1]]
    table = format_markdown({"settings": {"samples": 8, "seed": 0}, "tasks": [
        {"name": "prefs", "family": "preference", "items": 2, "chance": 0.5}], "checkpoints": [
        {"label": "x", "paradigm": "ar", "vocab_size": 8192}], "results": {"x": {"prefs": r}}})
    assert "| prefs (2) | accuracy (per-token norm.) | 50.0% | 50.0% |" in table
    held_out = resolve_task(f"pref:{DPO_DATA}")
    assert held_out.family == "preference" and len(held_out.items) == 28 and held_out.notes["split"] == "validation"


def test_nanollada_eval_scores_preference_pairs_for_every_paradigm(tmp_path, cli):
    import json
    paths = []
    for cls in (ARDPO, MaskedDiffusionDPO):
        paths.append(tmp_path / f"{cls.paradigm}.ckpt")
        checkpoint(paths[-1], cls)
    out = tmp_path / "eval.json"
    r = cli(["eval", "--ckpt", *map(str, paths), "--tasks", f"pref:{DPO_DATA}", "--limit", "4", "--samples", "2",
             "--output", str(out)], cwd=tmp_path, threads=1)
    check_ok(r, "eval")
    res = json.loads(out.read_text())
    for label, per_task in res["results"].items():
        t = per_task[f"pref:{DPO_DATA.name.split('.')[0]}"]
        assert t["family"] == "preference" and t["items"] == 4 and 0 <= t["accuracy"] <= 1
    assert "chosen more likely per token" in r.stdout + r.stderr and "| pref:dpo (4) | accuracy" in r.stdout
