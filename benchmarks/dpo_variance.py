"""Variance of diffusion DPO's logit with shared vs independent noise (LLaDA 1.5 VRPO's antithetic sampling).

On the held-out pairs of a preference file (the 1/8 rule of ../shared/data/README.md), the DPO logit

    h = beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))]

is estimated ``--repeats`` times with fresh draws (``--samples`` ELBO draws per response, stratified times: exactly
the training estimator of ``nanollada.lm.dpo``) in two ways: the policy and the reference scored on the same times
and masks (``shared``, what training does) and on independent ones (``independent``). Reported per way: Var[h]
across repeats (per pair, then the mean over pairs), Var[B_pi - B_ref] per response, the mean h (both ways estimate
the same quantity), and the ratio independent / shared. With policy == reference the shared estimate is exactly 0.

    python benchmarks/dpo_variance.py --policy logs/real_cpu/diffusion_dpo/checkpoints/last.ckpt \\
        --reference logs/real_cpu/diffusion_sft/checkpoints/last.ckpt --data ../shared/data/pref/dpo-en.jsonl.gz \\
        --data ../shared/data/pref/dpo-zh.jsonl.gz --pairs 32 --samples 2 --repeats 16 --json variance.json

An AR checkpoint gives 0 both ways (its log-likelihoods are exact).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanollada.data.collate import DiffusionCollate  # noqa: E402
from nanollada.data.preference import preference_documents  # noqa: E402
from nanollada.loading import backbone_state, read_checkpoint  # noqa: E402


def dpo_module(policy: str, reference: str, beta: float = 0.1):
    """The checkpoint paradigm's DPO module (``lm.dpo.DPO_CLASSES``) with ``policy``'s backbone as the policy and
    ``reference``'s as the frozen reference, in eval mode on the CPU."""
    from nanollada.lm.dpo import DPO_CLASSES
    payload = read_checkpoint(policy)
    meta = payload["nanollada"]
    mc = meta["model_config"]
    extra = {k: v for k, v in meta.get("paradigm_config", {}).items() if k == "block_size"}
    with tempfile.TemporaryDirectory() as d:
        tok = os.path.join(d, "tokenizer.model")
        Path(tok).write_bytes(bytes(meta["tokenizer_model"].numpy().tobytes()))
        module = DPO_CLASSES[meta["paradigm"]](
            preset="tiny", d_model=mc["d_model"], n_layers=mc["n_layers"], n_heads=mc["n_heads"],
            n_kv_heads=mc["n_kv_heads"], max_seq_len=mc["max_seq_len"], tokenizer=tok, beta=beta, **extra)
    if module.config.to_dict() != mc:
        raise ValueError(f"could not rebuild the backbone of {policy}: {module.config.to_dict()} != {mc}")
    module.model.load_state_dict(backbone_state(payload["state_dict"]))
    module.reference.load_state_dict(backbone_state(read_checkpoint(reference)["state_dict"]))
    return module.eval()


def pair_batches(module, records: list[dict], seq_len: int, batch_size: int) -> list[dict]:
    """Preference batches of ``records`` as training builds them (``DiffusionCollate`` on the preference kind)."""
    tok = module.tokenizer
    items = []
    for rec in records:
        docs, _ = preference_documents(tok, rec, seq_len)
        items.append({name: {"tokens": torch.tensor(ids), "loss_mask": torch.tensor(mask)}
                      for name, (ids, mask) in zip(("chosen", "rejected"), docs)})
    collate = module.collate_cls("preference", tok.pad_id, tok.eos_id, max_len=seq_len)
    return [collate(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]


@torch.no_grad()
def measure(module, batches: list[dict], samples: int, repeats: int, seed: int = 0) -> dict:
    """Var[h] and Var[B_pi - B_ref] across ``repeats`` fresh draws, shared vs independent noise (see the module
    docstring). Returns JSON-ready numbers."""
    if repeats < 2:
        raise ValueError("need at least 2 repeats for a variance")
    h = module.hparams
    h.val_samples, beta = samples, h.beta
    out = {}
    for mode, shared in (("shared", True), ("independent", False)):
        h.shared_noise = shared
        logits, deltas = [], []
        start = time.perf_counter()
        for r in range(repeats):
            h.val_seed = seed + 7919 * r
            lg, dl = [], []
            for b, batch in enumerate(batches):
                policy, reference, _ = module.pair_logps(batch, b, train=False)
                B = policy.shape[0] // 2
                delta = (policy - reference).double()
                lg.append(beta * (delta[:B] - delta[B:]))
                dl.append(delta)
            logits.append(torch.cat(lg))
            deltas.append(torch.cat(dl))
        logits, deltas = torch.stack(logits), torch.stack(deltas)  # (R, pairs), (R, responses)
        out[mode] = {"var_logit": float(logits.var(0).mean()), "var_delta": float(deltas.var(0).mean()),
                     "mean_logit": float(logits.mean()), "seconds": time.perf_counter() - start}
    out["ratio_var_logit"] = out["independent"]["var_logit"] / max(out["shared"]["var_logit"], 1e-300)
    out["ratio_var_delta"] = out["independent"]["var_delta"] / max(out["shared"]["var_delta"], 1e-300)
    h.shared_noise = True
    return out


def main(argv: list[str] | None = None) -> dict:
    from nanollada.data.records import PREFERENCE_VAL_FRACTION, is_validation, iter_records
    from nanollada.evaluation.tasks import evenly_spaced
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="policy checkpoint (e.g. a DPO run's last.ckpt)")
    p.add_argument("--reference", required=True, help="reference checkpoint (e.g. the SFT checkpoint)")
    p.add_argument("--data", action="append", required=True, help="preference jsonl(.gz) file (repeatable)")
    p.add_argument("--pairs", type=int, default=32, help="held-out pairs used (spread evenly)")
    p.add_argument("--samples", type=int, default=2, help="ELBO draws per response (dpo_samples)")
    p.add_argument("--repeats", type=int, default=16, help="independent estimates per pair")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    records = [r for f in a.data for key, r in iter_records(f, "preference")
               if is_validation(key, PREFERENCE_VAL_FRACTION)]
    records = [records[i] for i in evenly_spaced(len(records), a.pairs)]
    module = dpo_module(a.policy, a.reference, a.beta)
    result = measure(module, pair_batches(module, records, a.seq_len, a.batch_size), a.samples, a.repeats, a.seed)
    result.update(policy=a.policy, reference=a.reference, paradigm=module.paradigm, pairs=len(records),
                  samples=a.samples, repeats=a.repeats, seq_len=a.seq_len, beta=a.beta)
    for mode in ("shared", "independent"):
        r = result[mode]
        print(f"[dpo_variance] {mode:>11}: Var[h] {r['var_logit']:.4g}, Var[B_pi - B_ref] {r['var_delta']:.4g}, "
              f"mean h {r['mean_logit']:+.4f} ({r['seconds']:.1f}s)")
    print(f"[dpo_variance] independent / shared: Var[h] x{result['ratio_var_logit']:.3g}, "
          f"Var[B_pi - B_ref] x{result['ratio_var_delta']:.3g} ({len(records)} pairs, K={a.samples}, "
          f"{a.repeats} repeats)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
