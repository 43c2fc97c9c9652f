"""Tiny checkpoints for the chat / serve / web-page tests, trained once per test session (a few steps each).

``trained(tmp_path_factory)`` returns {"ar": AR SFT, "dm": masked-diffusion SFT, "bd": block-diffusion SFT (block
size ``BD_BLOCK``, so a short answer spans several blocks), "pre": AR pretraining} checkpoint paths. The
pretraining one is the AR SFT checkpoint with its data kind set to ``pretrain`` (only the kind decides whether the
chat template is used), so three fits (run side by side, a few seconds each) cover the four. ``max_seq_len`` is 256
so answers fit but long conversations do not.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, DATA, finish, fit_config, start_cli

STEPS = dict(max_steps=4, val_check_interval=4, limit_val_batches=1, log_every_n_steps=2)
MAX_SEQ_LEN = 256
BD_BLOCK = 8
_CACHE: dict = {}


def trained(tmp_path_factory) -> dict[str, Path]:
    if _CACHE:
        return _CACHE
    work = tmp_path_factory.mktemp("serve_ckpts")
    cfgs = {name: fit_config(work / name, name, base=CONFIGS / "tiny" / base, trainer=STEPS,
                             train_files=[DATA / "sft.jsonl"], model=dict(init_from=None, max_seq_len=MAX_SEQ_LEN),
                             data=dict(seq_len=64, batch_size=4, max_val_rows=4))
            for name, base in (("ar", "ar_sft.yaml"), ("dm", "diffusion_sft.yaml"))}
    cfgs["bd"] = fit_config(work / "bd", "bd", base=CONFIGS / "tiny" / "block_diffusion_sft.yaml", trainer=STEPS,
                            train_files=[DATA / "sft.jsonl"],
                            model=dict(init_from=None, max_seq_len=MAX_SEQ_LEN, block_size=BD_BLOCK),
                            data=dict(seq_len=64, batch_size=4, max_val_rows=4))
    procs = [start_cli(["fit", "--config", c], work) for c in cfgs.values()]
    for p in procs:
        r = finish(p, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    paths = {name: work / name / "checkpoints" / "last.ckpt" for name in cfgs}
    payload = torch.load(paths["ar"], map_location="cpu", weights_only=True)
    payload["nanollada"]["data_kind"] = "pretrain"
    paths["pre"] = work / "pre.ckpt"
    torch.save(payload, paths["pre"])
    _CACHE.update(paths)
    return _CACHE


def require_chromium(environ=os.environ, which=shutil.which) -> str:
    """The headless browser of tests/test_web_page.py (Debian's ``chromium``). Missing it, CI (``CI`` set: .ci/run
    exports it after installing chromium) fails the run, never a silent skip; locally the module is skipped and the
    reason is also given as a warning, which pytest prints without ``-rs``."""
    path = which("chromium") or which("chromium-browser")
    if path:
        return path
    if environ.get("CI"):
        pytest.fail("CI is set but no chromium is on PATH: .ci/run could not install Debian's chromium package "
                    "(see its warning); the web-page test cannot run", pytrace=False)
    reason = "needs Debian's chromium package (apt-get install chromium); not run (CI unset)"
    warnings.warn(f"tests/test_web_page.py skipped: {reason}", pytest.PytestWarning)
    pytest.skip(reason, allow_module_level=True)
