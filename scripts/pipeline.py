#!/usr/bin/env python
"""The whole nanollada recipe in one resumable command (in the spirit of nanochat's speedrun).

    tokenizer -> prepare -> ar_pretrain -> diffusion_from_ar, block_diffusion_from_ar      (AR -> LLaDA 1.0 / 2.0)
              -> block_diffusion_editing_cpt                                           (2.0 -> 2.1 token editing)
              -> ar_sft, diffusion_sft, block_diffusion_sft, block_diffusion_editing_sft     (SFT of each)
              -> ar_dpo, diffusion_dpo, block_diffusion_dpo                            (DPO after SFT)
              -> validate -> compare -> eval -> generate -> results (logs/<run>/results.md)

    python scripts/pipeline.py --profile cpu            # small preset on the real zh+en data, ~1 hour on 2 cores
    python scripts/pipeline.py --profile gpu            # the flagship (base preset, bf16) on one GPU
    python scripts/pipeline.py --profile tiny --max_steps 4 --logs_dir /tmp/x   # plumbing check on bundled data
    python scripts/pipeline.py --profile cpu --steps ar_pretrain=300 --steps ar_sft=100   # per-stage budgets
    nanollada pipeline ...                               # the same

Profiles choose a config set: ``gpu`` = configs/real/*.yaml, ``cpu`` = configs/real/cpu/*.yaml, ``tiny`` =
configs/tiny/*.yaml. Everything a run writes lives under ``<logs_dir>/<run>/`` (``--run``, default ``real``,
``real_cpu`` or ``tiny``): per stage a directory with the derived config (``fit.yaml``: the profile's config with its
logger, checkpoint directory and ``init_from`` pointed into the run), the subprocess log, TensorBoard events,
checkpoints and a ``done.json`` marker written after success. A stage with a marker is skipped; a training stage
without one resumes from its ``checkpoints/last.ckpt`` (``--ckpt_path``) when that exists. So an interrupted run is
continued by running the same command again, and a finished one is a no-op (``--redo STAGE`` drops a marker).

Training stages run ``python -m nanollada fit --config <run>/<stage>/fit.yaml [--KEY=VALUE ...]`` as subprocesses
(cwd: the repository root, so the configs' relative paths hold); ``--set KEY=VALUE`` reaches LightningCLI as it is
(``--KEY=VALUE`` after ``--config``, for fit and validate; the prepare stage resolves ``data.*`` ones the same way).
The evaluation stages run ``nanollada validate --results_json`` (val/nll of every stage's final checkpoint on its
own validation rows, read back from that JSON; preference accuracy for the DPO stages), ``nanollada compare`` (the
SFT checkpoints on a few English and Chinese instructions), ``nanollada eval`` (perplexity of the validation
records per source, BLiMP / CLiMP / ChID / CMMLU, held-out preference accuracy, every checkpoint side by side) and
``nanollada eval --generate`` (the SFT and DPO checkpoints answer held-out SFT prompts with every decoder; judge
perplexity under the AR SFT model, repetition, length, empty answers, tokens per forward, tokens/s and a plot).

The run works in the repository of the working directory when that is a nanollada checkout (``--repo`` to choose
another): configs are read from it, logs written under its ``logs/``, and its package is the one the stages import
(``PYTHONPATH``). ``--dry_run`` prints every command and derived config path and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

SCRIPT_REPO = Path(__file__).resolve().parents[1]  # the checkout this script belongs to
if str(SCRIPT_REPO) not in sys.path:
    sys.path.insert(0, str(SCRIPT_REPO))
REPO = SCRIPT_REPO  # the repository a run works in: main() sets it from --repo / the working directory


def find_repo(explicit: str | None) -> Path:
    """The repository a run reads its configs from and writes its logs under: ``--repo``, else the working
    directory when it is a nanollada checkout (``configs/`` and ``scripts/pipeline.py``), else this script's
    checkout. So ``nanollada pipeline`` run inside a clone works in that clone, not in the one it was installed
    from."""
    if explicit:
        repo = Path(explicit).resolve()
        if not (repo / "configs").is_dir():
            raise SystemExit(f"--repo {explicit}: no configs/ directory there (want a nanollada checkout)")
        return repo
    cwd = Path.cwd().resolve()
    if (cwd / "configs").is_dir() and (cwd / "scripts" / "pipeline.py").is_file():
        return cwd
    return SCRIPT_REPO

import yaml  # noqa: E402

# training stage -> the stage whose last.ckpt it starts from (model.init_from; DPO: also its frozen reference)
INIT_FROM = {"ar_pretrain": None, "diffusion_from_ar": "ar_pretrain", "block_diffusion_from_ar": "ar_pretrain",
             "block_diffusion_editing_cpt": "block_diffusion_from_ar",  # LLaDA 2.1 continues from 2.0
             "ar_sft": "ar_pretrain", "diffusion_sft": "diffusion_from_ar",
             "block_diffusion_sft": "block_diffusion_from_ar",
             "block_diffusion_editing_sft": "block_diffusion_editing_cpt",
             "ar_dpo": "ar_sft", "diffusion_dpo": "diffusion_sft", "block_diffusion_dpo": "block_diffusion_sft"}
TRAIN_STAGES = tuple(INIT_FROM)
DPO_STAGES = ("ar_dpo", "diffusion_dpo", "block_diffusion_dpo")  # validated on preference accuracy, not val/nll
SFT_STAGES = ("ar_sft", "diffusion_sft", "block_diffusion_sft", "block_diffusion_editing_sft")  # compared
GENERATE_STAGES = (*SFT_STAGES, *DPO_STAGES)  # generate for held-out SFT prompts, judged by ar_sft
STAGES = ("tokenizer", "prepare", *TRAIN_STAGES, "validate", "compare", "eval", "generate", "results")

PROMPTS_EN = ["Give three tips for staying healthy.", "Explain why the sky is blue.",
              "Write a short story about a cat who learns to swim.", "What is the capital of France?"]
PROMPTS_ZH = ["请简单介绍一下长城。", "用三句话描述春天。", "写一首关于月亮的短诗。", "如何学好一门外语？"]
EVAL_TASKS = ["ppl-en-gutenberg", "ppl-en-shakespeare", "ppl-zh-modern", "ppl-zh-novels", "ppl-zh-poetry",
              "blimp", "climp", "chid", "cmmlu", "pref-dpo-en", "pref-dpo-zh"]
HELDOUT_SFT = ["sft:{root}/sft/alpaca-en.jsonl.gz", "sft:{root}/sft/alpaca-zh.jsonl.gz"]  # generate stage prompts

PROFILES = {
    "tiny": dict(configs="configs/tiny", run="tiny", prompts=PROMPTS_EN[:1] + PROMPTS_ZH[:1],
                 compare=["--max_new_tokens", "16", "--block_length", "16", "--strategies", "[low_confidence]"],
                 eval_tasks=["ppl:data/pretrain.jsonl", "pref:data/dpo.jsonl"],  # held-out records only
                 eval_args=["--limit", "4", "--samples", "2", "--batch_size", "4", "--val_fraction", "0.05"],
                 generate_prompts=["sft:data/sft.jsonl"], generate_limit=2, val_fraction=0.05,
                 generate=["--max_new_tokens", "8", "--strategies", "threshold", "--sweep", "threshold=0.5,0.9"]),
    "cpu": dict(configs="configs/real/cpu", run="real_cpu", prompts=PROMPTS_EN[:3] + PROMPTS_ZH[:3],
                compare=["--max_new_tokens", "64", "--block_length", "32", "--strategies",
                         "[low_confidence, threshold]"],
                eval_tasks=EVAL_TASKS, eval_args=["--limit", "32", "--samples", "4", "--batch_size", "16"],
                generate_prompts=HELDOUT_SFT, generate_limit=4,  # 4 en + 4 zh: ~1 min per decoder on 2 cores
                generate=["--max_new_tokens", "32", "--strategies", "threshold", "--sweep", "threshold=0.5,0.9"]),
    "gpu": dict(configs="configs/real", run="real", prompts=PROMPTS_EN + PROMPTS_ZH,
                compare=["--max_new_tokens", "128", "--block_length", "32"],
                eval_tasks=EVAL_TASKS, eval_args=["--limit", "1000", "--samples", "8", "--batch_size", "32"],
                generate_prompts=HELDOUT_SFT, generate_limit=32,
                generate=["--max_new_tokens", "128", "--strategies", "low_confidence", "threshold",
                          "--sweep", "threshold=0.5,0.7,0.9"]),
}
VALIDATE_SNIPPET = """
import json, sys
from nanollada.cli import main
for stage, config, ckpt, results, overrides in json.loads(sys.argv[1]):
    print("===== validate " + stage, flush=True)
    main(["validate", "--config", config, "--ckpt_path", ckpt, "--trainer.logger=false", *overrides,
          "--results_json", results])
    sys.stdout.flush()
"""


def log(msg: str) -> None:
    print(f"[pipeline {datetime.now():%H:%M:%S}] {msg}", flush=True)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.profile = PROFILES[args.profile]
        self.run_name = args.run or self.profile["run"]
        self.root = Path(args.logs_dir).resolve() / self.run_name
        self.config_dir = REPO / self.profile["configs"]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        # the stages import this repository's package, not whichever clone nanollada was installed from
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        if args.data_root:
            self.env["NANOLLADA_DATA"] = str(Path(args.data_root).resolve())
        self.data_root = self.env.get("NANOLLADA_DATA")
        self.overrides = lightning_overrides(args.set)
        self.configs = {s: self.derive_config(s) for s in TRAIN_STAGES}

    # ------------------------------------------------------------------ paths and markers
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def marker(self, stage: str) -> Path:
        return self.stage_dir(stage) / "done.json"

    def final_ckpt(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints" / "last.ckpt"

    def done(self, stage: str) -> dict | None:
        m = self.marker(stage)
        return json.loads(m.read_text()) if m.is_file() else None

    def mark_done(self, stage: str, **info) -> None:
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        tmp = self.marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": stage, "finished": datetime.now().isoformat(timespec="seconds"), **info},
                                  indent=1, ensure_ascii=False))
        os.replace(tmp, self.marker(stage))

    # ------------------------------------------------------------------ configs
    def derive_config(self, stage: str) -> dict:
        """The profile's config for ``stage`` with every output and ``init_from`` pointed into the run."""
        src = self.config_dir / f"{stage}.yaml"
        if not src.is_file():
            raise SystemExit(f"missing config {src}")
        cfg = yaml.safe_load(src.read_text(encoding="utf-8"))
        tr, a = cfg["trainer"], self.args
        tr["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": str(self.root), "name": stage, "version": "tensorboard"}}
        if a.max_steps:
            tr["max_steps"] = a.max_steps
        if stage in a.stage_steps:
            tr["max_steps"] = a.stage_steps[stage]
        steps = tr["max_steps"]
        if tr.get("val_check_interval") and isinstance(tr["val_check_interval"], int):
            tr["val_check_interval"] = min(tr["val_check_interval"], steps)
        if a.limit_val_batches is not None:
            tr["limit_val_batches"] = a.limit_val_batches
            if a.limit_val_batches == 1:  # LightningCLI reads 1 as 1.0 (= all batches): cap the rows instead
                tr["limit_val_batches"] = 1.0
                cfg["data"]["max_val_rows"] = cfg["data"].get("batch_size", 16)
        if a.quiet or not sys.stdout.isatty():
            tr["enable_progress_bar"] = False
        for cb in tr.get("callbacks") or []:
            if cb["class_path"].endswith("ModelCheckpoint") and (cb.get("init_args") or {}).get("monitor"):
                cb["init_args"]["dirpath"] = str(self.stage_dir(stage) / "checkpoints" / "best")  # top-k by metric
            elif cb["class_path"].endswith("ModelCheckpoint"):
                ia = cb.setdefault("init_args", {})
                ia["dirpath"] = str(self.stage_dir(stage) / "checkpoints")
                ia["save_last"] = True
                every = ia.get("every_n_train_steps") or steps
                # last.ckpt must hold the final step: Lightning saves it only on every_n_train_steps boundaries.
                ia["every_n_train_steps"] = every if steps % every == 0 else steps
        init = INIT_FROM[stage]
        cfg["model"]["init_args"]["init_from"] = str(self.final_ckpt(init)) if init else None
        if a.cache_dir:
            cfg["data"]["cache_dir"] = str(Path(a.cache_dir).resolve())
        return cfg

    def write_config(self, stage: str) -> Path:
        path = self.stage_dir(stage) / "fit.yaml"
        if self.args.dry_run:  # a dry run writes nothing: the path is only printed
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (f"# derived by scripts/pipeline.py from {self.config_dir.relative_to(REPO)}/{stage}.yaml "
                f"(run {self.run_name})\n" + yaml.safe_dump(self.configs[stage], sort_keys=False, allow_unicode=True))
        path.write_text(text, encoding="utf-8")
        return path

    def tokenizer_path(self) -> str | None:
        toks = {s: self.configs[s]["data"].get("tokenizer") for s in TRAIN_STAGES}
        if len(set(toks.values())) != 1:
            raise SystemExit(f"the stages use different tokenizers: {toks}")
        return next(iter(toks.values()))

    # ------------------------------------------------------------------ subprocesses
    def run_cmd(self, cmd: list[str], logfile: Path, echo: bool | None = None) -> tuple[int, str]:
        """Run ``cmd`` in the repository root, teeing its output to ``logfile`` (and the console unless quiet)."""
        echo = not self.args.quiet if echo is None else echo
        shown = cmd if cmd[1:2] != ["-c"] else [cmd[0], "-c", "<script>", *cmd[3:]]
        log(f"$ {shlex.join(shown)}  (log: {logfile})")
        if self.args.dry_run:
            return 0, ""
        logfile.parent.mkdir(parents=True, exist_ok=True)
        out = []
        with open(logfile, "ab") as fh:
            fh.write(f"\n##### {datetime.now().isoformat(timespec='seconds')} $ {shlex.join(shown)}\n".encode())
            # raw chunks, not lines: a progress bar's carriage returns reach the console (and the log) as they are
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                while chunk := proc.stdout.read1(1 << 16):
                    fh.write(chunk)
                    fh.flush()
                    out.append(chunk)
                    if echo:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
        return rc, b"".join(out).decode("utf-8", errors="replace")

    def nanollada(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nanollada", *args]

    def fail(self, stage: str, rc: int, output: str) -> None:
        tail = "\n".join(output.splitlines()[-40:])
        raise SystemExit(f"[pipeline] stage {stage} failed (exit {rc}); log: {self.stage_dir(stage)}\n{tail}\n"
                         f"[pipeline] fix the cause and run the same command again: finished stages are skipped and "
                         f"training resumes from its last checkpoint")

    # ------------------------------------------------------------------ stages
    def stage_tokenizer(self) -> dict:
        tok = self.tokenizer_path()
        if tok is None:
            log("tokenizer: the configs use the tokenizer shipped with nanollada")
            return {"tokenizer": "shipped", "trained": False}
        path = Path(tok) if Path(tok).is_absolute() else REPO / tok
        if path.is_dir():
            path = path / "tokenizer.model"
        if path.is_file():
            log(f"tokenizer: {path} present")
            return {"tokenizer": str(path), "trained": False}
        if path.name != "tokenizer.model":
            raise SystemExit(f"tokenizer {path} is missing and cannot be trained here (want <dir>/tokenizer.model)")
        cmd = [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--output", str(path.parent)]
        if self.data_root:
            cmd += ["--data_root", self.data_root]
        rc, out = self.run_cmd(cmd, self.stage_dir("tokenizer") / "tokenizer.log")
        if rc:
            self.fail("tokenizer", rc, out)
        return {"tokenizer": str(path), "trained": True}

    def stage_prepare(self) -> dict:
        """Token caches of every stage's data (in this process: ``nanollada.prepare``, as ``nanollada prepare``)."""
        from nanollada.prepare import format_summary, prepare_config
        d = self.stage_dir("prepare")
        if self.args.dry_run:
            for s in TRAIN_STAGES:
                log(f"prepare: data of {s} (as `nanollada prepare --config {self.write_config(s)}`)")
            return {}
        d.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[str]] = {}
        for s in TRAIN_STAGES:  # stages with the same data section share their caches: summarise once
            groups.setdefault(json.dumps(self.configs[s]["data"], sort_keys=True), []).append(s)
        sections, summaries = [], {}
        with open(d / "prepare.log", "a", encoding="utf-8") as fh:
            def plog(msg: str) -> None:
                fh.write(msg + "\n")
                fh.flush()
                if not self.args.quiet:
                    print(msg, flush=True)
            for stages in groups.values():
                cfg = self.write_config(stages[0])
                log(f"prepare: data of {', '.join(stages)} (as `nanollada prepare --config {cfg}`)")
                if self.args.dry_run:
                    continue
                old = os.environ.get("NANOLLADA_DATA")
                if self.data_root:
                    os.environ["NANOLLADA_DATA"] = self.data_root
                cwd = os.getcwd()
                os.chdir(REPO)  # the configs' relative paths (data, tokenizer, cache) are repository-relative
                try:
                    r = prepare_config(cfg, log=plog, overrides=self.overrides)
                except (FileNotFoundError, ValueError) as e:
                    raise SystemExit(f"[pipeline] prepare failed: {e}")
                finally:
                    os.chdir(cwd)
                    if self.data_root:
                        os.environ.pop("NANOLLADA_DATA") if old is None else os.environ.update(NANOLLADA_DATA=old)
                kind = self.configs[stages[0]]["data"].get("kind", "pretrain")
                sections.append(f"### {kind} data of {', '.join(stages)}\n\n{format_summary(r)}\n")
                summaries[",".join(stages)] = r.to_dict()
        if self.args.dry_run:
            return {}
        (d / "prepare.md").write_text("\n".join(sections), encoding="utf-8")
        (d / "prepare.json").write_text(json.dumps(summaries, indent=1, ensure_ascii=False), encoding="utf-8")
        if not self.args.quiet:
            print("\n".join(sections), flush=True)
        return {"summary": str(d / "prepare.md")}

    def stage_train(self, stage: str) -> dict:
        init = INIT_FROM[stage]
        if init and not self.args.dry_run and not self.final_ckpt(init).is_file():
            raise SystemExit(f"[pipeline] {stage} needs {self.final_ckpt(init)} (stage {init} has not finished)")
        cfg_path = self.write_config(stage)
        cmd = self.nanollada("fit", "--config", str(cfg_path), *self.overrides)
        last = self.final_ckpt(stage)
        resumed = last.is_file()
        if resumed:
            cmd += ["--ckpt_path", str(last)]
            log(f"{stage}: resuming from {last}")
        start = time.time()
        rc, out = self.run_cmd(cmd, self.stage_dir(stage) / "train.log")
        if rc:
            self.fail(stage, rc, out)
        if self.args.dry_run:
            return {}
        max_steps = self.configs[stage]["trainer"]["max_steps"]
        step = checkpoint_step(last)
        if step is None or step < max_steps:
            raise SystemExit(f"[pipeline] {stage}: fit exited 0 but {last} holds step {step}, not {max_steps} "
                             "(interrupted?); run again to resume")
        return {"checkpoint": str(last), "steps": step, "seconds": round(time.time() - start, 1),
                "resumed": resumed, "config": str(cfg_path), "model": self.configs[stage]["model"]["class_path"],
                "init_from": self.configs[stage]["model"]["init_args"].get("init_from")}

    def stage_validate(self) -> dict:
        """``nanollada validate`` of every stage's final checkpoint, all four in one process (one start-up)."""
        d = self.stage_dir("validate")
        jobs = [(s, str(self.write_config(s)), str(self.final_ckpt(s)), str(d / f"{s}.json"), self.overrides)
                for s in TRAIN_STAGES]
        for s, cfg, ckpt, out_json, overrides in jobs:
            Path(out_json).unlink(missing_ok=True)
            log(f"validate {s}: " + shlex.join(["nanollada", "validate", "--config", cfg, "--ckpt_path", ckpt,
                                                "--trainer.logger=false", *overrides, "--results_json", out_json]))
        rc, out = self.run_cmd([sys.executable, "-c", VALIDATE_SNIPPET, json.dumps(jobs)], d / "validate.log",
                               echo=False)
        if rc:
            self.fail("validate", rc, out)
        if self.args.dry_run:
            return {}
        results = {}
        for stage, _, _, out_json, _ in jobs:  # structured results, not the console table
            if Path(out_json).is_file():
                results[stage] = json.loads(Path(out_json).read_text(encoding="utf-8"))["metrics"]
                log(f"validate {stage}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[stage].items()))
        missing = [s for s in TRAIN_STAGES if validation_metric(s) not in results.get(s, {})]
        if missing:
            self.fail("validate", 1, out + f"\nno {', '.join(validation_metric(s) for s in missing)} found for "
                                           f"{missing}")
        (d / "validate.json").write_text(json.dumps(results, indent=1))
        return {"metrics": results}

    def stage_compare(self) -> dict:
        d = self.stage_dir("compare")
        ckpts = ", ".join(str(self.final_ckpt(s)) for s in SFT_STAGES)
        cmd = self.nanollada("compare", "--ckpt", f"[{ckpts}]", "--output", str(d / "compare.json"),
                             *self.profile["compare"])
        for p in self.profile["prompts"]:
            cmd += ["--prompt", p]
        from nanollada.evaluation.compare import format_table
        return self.run_tabled("compare", cmd, format_table)

    def run_tabled(self, stage: str, cmd: list[str], format_table) -> dict:
        """Run a command that writes ``<stage>/<stage>.json`` (on ``--device`` when given), fail the stage on a
        non-zero exit, and write that JSON as ``<stage>/<stage>.md`` with ``format_table``."""
        d = self.stage_dir(stage)
        if self.args.device:
            cmd = [*cmd, "--device", self.args.device]
        rc, out = self.run_cmd(cmd, d / f"{stage}.log")
        if rc:
            self.fail(stage, rc, out)
        if self.args.dry_run:
            return {}
        result = json.loads((d / f"{stage}.json").read_text(encoding="utf-8"))
        (d / f"{stage}.md").write_text(format_table(result).strip() + "\n", encoding="utf-8")
        return {"table": str(d / f"{stage}.md")}

    def stage_eval(self) -> dict:
        from nanollada.commands import COMMANDS
        if "eval" not in COMMANDS:
            log("eval: `nanollada eval` is not available in this version; skipped")
            return {"skipped": "no eval command"}
        d = self.stage_dir("eval")
        tasks = self.args.eval_tasks or self.profile["eval_tasks"]
        cmd = self.nanollada("eval", "--ckpt", *(str(self.final_ckpt(s)) for s in TRAIN_STAGES), "--tasks", *tasks,
                             "--output", str(d / "eval.json"), "--markdown", str(d / "eval.md"),
                             *self.profile["eval_args"])
        if self.args.eval_limit is not None:
            cmd += ["--limit", str(self.args.eval_limit)]
        if self.data_root:
            cmd += ["--data_root", self.data_root]
        if self.args.device:
            cmd += ["--device", self.args.device]
        rc, out = self.run_cmd(cmd, d / "eval.log")
        if rc:
            self.fail("eval", rc, out)
        return {"table": str(d / "eval.md")}

    def stage_generate(self) -> dict:
        """``nanollada eval --generate``: the SFT and DPO checkpoints answer the same held-out SFT prompts with every
        decoder of the profile; judge perplexity under ``ar_sft``, repetition, length, empty answers, TPF, tokens/s,
        and a plot of quality against speed."""
        d = self.stage_dir("generate")
        prompts = []
        for spec in self.profile["generate_prompts"]:
            spec = spec.format(root=self.data_root or self.configs["ar_sft"]["data"].get("data_root") or "")
            if not self.args.dry_run:
                from nanollada.evaluation.generation import load_prompts
                cwd = os.getcwd()
                os.chdir(REPO)
                try:
                    got, where = load_prompts(spec, self.profile["generate_limit"],
                                              val_fraction=self.profile.get("val_fraction", 2 / 256))
                finally:
                    os.chdir(cwd)
                log(f"generate: {where}")
                prompts += got
        path = d / "prompts.jsonl"
        if not self.args.dry_run:
            d.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
                            encoding="utf-8")
        cmd = self.nanollada("eval", "--generate", "--ckpt", *(str(self.final_ckpt(s)) for s in GENERATE_STAGES),
                             "--judge", str(self.final_ckpt("ar_sft")), "--prompts", str(path),
                             *self.profile["generate"], "--output", str(d / "generate.json"),
                             "--plot", str(d / "generate.png"))
        from nanollada.evaluation.generation import format_sweep
        info = self.run_tabled("generate", cmd, format_sweep)
        return {**info, "plot": str(d / "generate.png")} if info else info

    def stage_results(self) -> dict:
        if self.args.dry_run:
            return {}
        path = self.root / "results.md"
        path.write_text(self.results_markdown(), encoding="utf-8")
        log(f"results: {path}")
        return {"results": str(path)}

    # ------------------------------------------------------------------ report
    def results_markdown(self) -> str:
        rel = lambda p: os.path.relpath(p, self.root) if p else ""  # noqa: E731
        lines = [f"# nanollada pipeline: run `{self.run_name}` (profile `{self.args.profile}`)", "",
                 f"- generated {datetime.now().isoformat(timespec='seconds')} in `{self.root}`",
                 f"- configs: `{self.config_dir.relative_to(REPO)}/`, data root: "
                 f"`{self.data_root or 'from the configs (data.data_root)'}`",
                 f"- tokenizer: `{(self.done('tokenizer') or {}).get('tokenizer', self.tokenizer_path())}`",
                 f"- command: `{' '.join(['python scripts/pipeline.py', *map(shlex.quote, self.args.argv)])}`", ""]
        val = (self.done("validate") or {}).get("metrics", {})
        lines += ["## Training stages", "",
                  "| stage | model | preset | init from | steps | wall time | train tok/s | train loss first → last "
                  "| val/nll | val/ppl | checkpoint |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        total = 0.0
        for s in TRAIN_STAGES:
            info, cfg = self.done(s) or {}, self.configs[s]
            m = val.get(s, {})
            total += info.get("seconds", 0.0)
            nll = f"{m['val/nll']:.4f}" if "val/nll" in m else "-"
            ppl = f"{m['val/ppl']:.2f}" if "val/ppl" in m else "-"
            if s in DPO_STAGES and "val/reward_accuracy" in m:  # preference pairs: no val/nll
                nll = f"reward acc {m['val/reward_accuracy']:.3f}"
                ppl = f"likelihood acc {m.get('val/likelihood_accuracy', float('nan')):.3f}"
            tb = train_scalars(self.stage_dir(s) / "tensorboard")
            # TokenThroughputMonitor: all devices' tokens/s with several devices, else the one device's
            speeds = tb.get("train/items_per_sec") or tb.get("train/device/items_per_sec")
            speed = f"{statistics.median(speeds):,.0f}" if speeds else "-"
            losses = tb.get("train/loss") or []
            loss = f"{statistics.mean(losses[:10]):.3f} → {statistics.mean(losses[-10:]):.3f}" if losses else "-"
            lines.append(f"| {s} | {cfg['model']['class_path'].rsplit('.', 1)[-1]} | "
                         f"{cfg['model']['init_args'].get('preset')} | {INIT_FROM[s] or '-'} | {info.get('steps', '-')} "
                         f"| {fmt_seconds(info.get('seconds'))} | {speed} | {loss} | {nll} | {ppl} "
                         f"| {rel(info.get('checkpoint'))} |")
        lines += ["", f"Training wall time (this invocation's stages, excluding resumed parts): {fmt_seconds(total)}. "
                  "val/nll: nats per token on each stage's own validation rows (pretraining rows for the pretraining "
                  "stages, SFT answers for the SFT stages), limited by the config's `limit_val_batches`; exact for "
                  "AR, an ELBO upper bound for diffusion; the DPO stages show the held-out preference pairs' reward "
                  "accuracy (policy-vs-reference margin of chosen above rejected) and likelihood accuracy (chosen "
                  "more likely per token). train tok/s: the median of the logged tokens/s "
                  "(`train/device/items_per_sec` of Lightning's ThroughputMonitor; tokens in the batches, padding "
                  "included, validation time excluded); train loss: the mean of the first and of the last ten "
                  "logged values (every `log_every_n_steps` steps).", ""]
        for title, stage, name in (("Data", "prepare", "prepare.md"), ("AR vs diffusion on the same prompts "
                                   "(SFT checkpoints)", "compare", "compare.md"), ("Evaluation", "eval", "eval.md"),
                                   ("Generation quality against speed (held-out SFT prompts)", "generate",
                                    "generate.md")):
            lines += [f"## {title}", ""]
            f = self.stage_dir(stage) / name
            info = self.done(stage) or {}
            if f.is_file():
                lines += [f.read_text(encoding="utf-8").strip().replace(f"{self.root}{os.sep}", ""), ""]
            else:
                lines += [f"(not available: {info.get('skipped', 'stage did not run')})", ""]
        lines += ["## Stage timings", "", "| stage | finished | wall time |", "|---|---|---|"]
        for s in STAGES[:-1]:
            info = self.done(s) or {}
            lines.append(f"| {s} | {info.get('finished', '-')} | {fmt_seconds(info.get('seconds'))} |")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        a = self.args
        for s in a.redo:
            if self.marker(s).is_file():
                self.marker(s).unlink()
                log(f"{s}: marker removed (--redo)")
        if not a.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
        log(f"run {self.run_name} (profile {a.profile}) in {self.root}" + (" (dry run: nothing is written)"
                                                                              if a.dry_run else ""))
        ran = False
        for stage in STAGES:
            if a.only and stage not in a.only:
                continue
            if stage == "results" and ran and not a.dry_run:  # rebuilt whenever another stage ran
                self.marker("results").unlink(missing_ok=True)
            if self.done(stage):
                log(f"{stage}: done ({self.marker(stage)}), skipped")
                continue
            log(f"{stage}: starting")
            start = time.time()
            fn = getattr(self, f"stage_{stage}", None) or (lambda s=stage: self.stage_train(s))
            info = fn()
            ran = True
            if not a.dry_run:
                info.setdefault("seconds", round(time.time() - start, 1))
                self.mark_done(stage, **info)
                log(f"{stage}: finished in {fmt_seconds(info['seconds'])}")
            if a.stop_after == stage:
                log(f"stopping after {stage} (--stop_after)")
                return


def validation_metric(stage: str) -> str:
    """The metric ``validate`` must report for ``stage``: preference accuracy for DPO, val/nll otherwise."""
    return "val/reward_accuracy" if stage in DPO_STAGES else "val/nll"


def parse_stage_steps(items: list[str]) -> dict[str, int]:
    """``--steps STAGE=N`` items -> {stage: N}; unknown stages and bad numbers are refused."""
    out = {}
    for item in items:
        stage, sep, n = item.partition("=")
        if not sep or stage not in TRAIN_STAGES or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--steps wants STAGE=N with N >= 1 and STAGE one of {', '.join(TRAIN_STAGES)}; "
                             f"got {item!r}")
        out[stage] = int(n)
    return out


def lightning_overrides(items: list[str]) -> list[str]:
    """``--set KEY=VALUE`` items as LightningCLI arguments, unchanged: ``--KEY=VALUE``."""
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE (a LightningCLI dotted key), got {item!r}")
        if key == "trainer.max_steps":
            raise SystemExit("use --max_steps N (the pipeline checks each stage's final step against it)")
        out.append(f"--{item}")
    return out


def checkpoint_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    import torch
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unpickling errors have many types
        return None
    return payload.get("global_step") if isinstance(payload, dict) else None


def train_scalars(event_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in the TensorBoard event files under ``event_dir``, in step order (all event files of
    the stage, so a resumed run's steps are included; a step logged by both attempts appears twice)."""
    if not event_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(event_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: [v for _, v in sorted(points, key=lambda p: p[0])] for tag, points in series.items()}


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="nanollada pipeline", description=__doc__.split("\n\n")[0],
                                 epilog="Stages: " + " -> ".join(STAGES))
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                    help="config set: gpu = configs/real, cpu = configs/real/cpu, tiny = configs/tiny (tests)")
    ap.add_argument("--run", default=None, help="run name: outputs go to <logs_dir>/<run>/ (default: real, real_cpu, "
                    "tiny by profile)")
    ap.add_argument("--logs_dir", default=None, help="parent of the run directory (default: <repo>/logs)")
    ap.add_argument("--max_steps", type=int, default=None, help="override trainer.max_steps of every training stage")
    ap.add_argument("--steps", action="append", default=[], metavar="STAGE=N",
                    help="override trainer.max_steps of one stage (repeatable; wins over --max_steps), e.g. "
                         "--steps ar_pretrain=300")
    ap.add_argument("--repo", default=None, help="repository to work in: configs from <repo>/configs, logs under "
                    "<repo>/logs (default: the working directory when it is a nanollada checkout, else the "
                    "checkout of this script)")
    ap.add_argument("--limit_val_batches", type=float, default=None,
                    help="override trainer.limit_val_batches of every stage (>= 1: batches, < 1: fraction)")
    ap.add_argument("--data_root", default=None, help="data directory for every stage (sets NANOLLADA_DATA)")
    ap.add_argument("--cache_dir", default=None, help="token cache directory (default: the configs' data/cache)")
    ap.add_argument("--device", default=None, help="device of compare/eval (cpu, cuda, auto)")
    ap.add_argument("--eval_tasks", nargs="+", default=None, help="tasks of the eval stage (default: by profile)")
    ap.add_argument("--eval_limit", type=int, default=None, help="items per eval task (default: by profile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="LightningCLI override for every stage's fit and validate (and prepare's data), passed "
                         "as --KEY=VALUE, e.g. --set data.num_workers=0")
    ap.add_argument("--redo", nargs="+", default=[], choices=STAGES, help="drop these stages' done markers first")
    ap.add_argument("--only", nargs="+", default=None, choices=STAGES, help="run only these stages (in order)")
    ap.add_argument("--stop_after", default=None, choices=STAGES, help="stop after this stage")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--quiet", action="store_true", help="subprocess output only to the stage logs")
    args = ap.parse_args(argv)
    global REPO
    REPO = find_repo(args.repo)
    args.logs_dir = args.logs_dir or str(REPO / "logs")
    args.stage_steps = parse_stage_steps(args.steps)
    if args.limit_val_batches is not None and args.limit_val_batches >= 1:
        args.limit_val_batches = int(args.limit_val_batches)
    args.argv = argv
    Pipeline(args).run()


if __name__ == "__main__":
    main()
