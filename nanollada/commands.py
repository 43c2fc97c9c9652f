"""The project's own commands beside LightningCLI's: tokenizer, predict (and, as they land, compare, eval, ...).

Each command is a function ``(argv) -> None`` whose docstring's first line is its one-line help.
"""

from __future__ import annotations

import argparse


def tokenizer_command(argv: list[str]) -> None:
    """train a SentencePiece tokenizer, or measure its characters per token"""
    from nanollada.cli_help import HelpFormatter
    parser = argparse.ArgumentParser(prog="nanollada tokenizer", description=tokenizer_command.__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    about = "train a BPE tokenizer (byte fallback) on jsonl/jsonl.gz files"
    tr = sub.add_parser("train", help=about, description=about, formatter_class=HelpFormatter)
    tr.add_argument("--input", nargs="+", required=True, help="pretrain or SFT jsonl(.gz) files")
    tr.add_argument("--vocab-size", type=int, default=8192, help="pieces in the vocabulary, special pieces included")
    tr.add_argument("--output", required=True, help="directory for tokenizer.model")
    tr.add_argument("--max-sentences", type=int, default=2_000_000, help="reservoir sample size of texts")
    about = "characters per token of a tokenizer on jsonl/jsonl.gz files"
    st = sub.add_parser("stats", help=about, description=about, formatter_class=HelpFormatter)
    st.add_argument("--input", nargs="+", required=True, help="pretrain or SFT jsonl(.gz) files to measure")
    st.add_argument("--tokenizer", default=None, help="model file or directory (default: the shipped one)")
    st.add_argument("--validation-only", action="store_true", help="only the records of the validation split")
    args = parser.parse_args(argv)
    from nanollada.tokenizer import Tokenizer, train_tokenizer
    if args.action == "train":
        path = train_tokenizer(args.input, args.output, args.vocab_size, args.max_sentences)
        tok = Tokenizer(path)
        print(f"wrote {path} (vocab {tok.vocab_size}; pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id}, "
              f"mask {tok.mask_id}, im_start {tok.im_start_id}, im_end {tok.im_end_id})")
        return
    from nanollada.data.records import SHARED_VAL_FRACTION, DataError, detect_kind, is_validation, iter_records
    tok = Tokenizer(args.tokenizer)
    print(f"| file | records | characters | tokens | chars/token |\n|---|---|---|---|---|")
    for f in args.input:
        n_rec = n_chars = n_tok = 0
        try:
            for key, rec in iter_records(f, detect_kind(f)):
                if args.validation_only and not is_validation(key, SHARED_VAL_FRACTION):
                    continue
                texts = [rec["text"]] if "text" in rec else [m["content"] for m in rec["conversations"]]
                n_rec += 1
                n_chars += sum(len(t) for t in texts)
                n_tok += sum(len(ids) for ids in tok.encode_batch(texts))
        except (DataError, FileNotFoundError) as e:
            raise SystemExit(str(e))
        print(f"| {f} | {n_rec} | {n_chars} | {n_tok} | {n_chars / max(n_tok, 1):.3f} |")


def _settings_parser(prog: str, doc: str, prompts: bool = True):
    """A jsonargparse parser with GenerationSettings' fields as flat flags (--temperature, --strategy, ...), plus
    --prompt / --prompts_file (unless ``prompts`` is False) and --device."""
    from jsonargparse import ArgumentParser

    from nanollada.generate import GenerationSettings
    parser = ArgumentParser(prog=prog, description=doc, default_env=False)
    parser.add_class_arguments(GenerationSettings, nested_key=None, as_group=True)
    if prompts:
        parser.add_argument("--prompt", action="append", type=str, default=[],
                            help="prompt text (repeat the flag for several)")
        parser.add_argument("--prompts_file", type=str | None, default=None,
                            help="a .txt file (one prompt per line) or .jsonl file with a 'prompt' field per line")
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto")
    return parser


def _settings(cfg):
    from nanollada.generate import GenerationSettings
    try:
        return GenerationSettings(**{f: cfg[f] for f in GenerationSettings.__dataclass_fields__})
    except ValueError as e:
        raise SystemExit(str(e))


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """Prompts from the command line and/or a file (``prediction.read_prompts``), errors as one line."""
    from nanollada.prediction import read_prompts as read
    try:
        return read(prompts, path)
    except ValueError as e:
        raise SystemExit(str(e))


def _device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def _load(path: str, device: str):
    from nanollada.loading import load_checkpoint
    try:
        return load_checkpoint(path, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))


def predict_command(argv: list[str]) -> None:
    """sample from a checkpoint of any paradigm and write JSONL (prompt, completion, tokens, seconds)"""
    import json
    import sys

    from nanollada.generate import generate_text
    parser = _settings_parser("nanollada predict", predict_command.__doc__ + ". The LightningCLI form, "
                              "nanollada predict --config C.yaml --ckpt_path K --data.predict_file F --output O, "
                              "runs Trainer.predict on any number of devices (see its --help).")
    parser.add_argument("--ckpt", type=str, required=True, help="a nanollada checkpoint (.ckpt)")
    parser.add_argument("--output", type=str | None, default=None, help="JSONL file to write (default: stdout only)")
    parser.add_argument("--trace", type=str | None, default=None,
                        help="diffusion: the denoising canvas of the first prompt, step by step: an HTML file to "
                             "write (slider + play button), or '-' to print it in the terminal")
    cfg = parser.parse_args(argv)
    settings = _settings(cfg)
    prompts = read_prompts(cfg.prompt, cfg.prompts_file)
    loaded = _load(cfg.ckpt, _device(cfg.device))
    if cfg.trace and not loaded.interface.supports_trace:
        raise SystemExit(f"--trace needs a diffusion checkpoint ({cfg.ckpt} is {loaded.paradigm})")
    records = []
    for i, p in enumerate(prompts):
        try:
            rec = generate_text(loaded, p, settings, trace_path=cfg.trace if i == 0 else None)
        except ValueError as e:
            raise SystemExit(f"prompt {p[:40]!r}...: {e}")
        records.append(rec)
        for note in rec.get("notes", []):
            print(f"[nanollada] note: {note}", file=sys.stderr)
        print(f"### {_printable(p)}\n{_printable(rec['completion'])}\n[{rec['tokens']} tokens, {rec['forwards']} "
              f"forwards, {rec['seconds']:.2f}s, {rec['tokens_per_second']:.1f} tok/s]\n", file=sys.stderr)
    if cfg.trace and cfg.trace != "-":
        print(f"wrote the denoising trace of the first prompt to {cfg.trace}", file=sys.stderr)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if cfg.output:
        with open(cfg.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {len(records)} records to {cfg.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _printable(text: str) -> str:
    """Text for a terminal: control characters (other than newline and tab) escaped, never echoed raw."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def compare_command(argv: list[str]) -> None:
    """run checkpoints of any paradigms on the same prompts: text side by side, latency, tokens/s, forwards"""
    import json

    from nanollada.evaluation.compare import compare, format_table
    parser = _settings_parser("nanollada compare", compare_command.__doc__)
    parser.add_argument("--ckpt", type=list[str], default=[],
                        help="checkpoints to compare, e.g. [ar.ckpt, diffusion.ckpt] (any paradigms, any number)")
    parser.add_argument("--ar", type=str | None, default=None, help="shorthand: an (AR) checkpoint, listed first")
    parser.add_argument("--diffusion", type=str | None, default=None,
                        help="shorthand: a (diffusion) checkpoint, listed after --ar")
    parser.add_argument("--strategies", type=list[str], default=["low_confidence", "threshold", "threshold_topk"],
                        help="decoding strategies to run for the checkpoints that have them (diffusion)")
    parser.add_argument("--output", type=str | None, default=None, help="JSON file for the full results")
    cfg = parser.parse_args(argv)
    settings = _settings(cfg)
    paths = [p for p in (cfg.ar, cfg.diffusion) if p] + list(cfg.ckpt)
    if not paths:
        raise SystemExit("nanollada compare: give checkpoints with --ckpt '[A, B]' (or --ar A --diffusion D)")
    prompts = read_prompts(cfg.prompt, cfg.prompts_file)
    device = _device(cfg.device)
    try:
        result = compare([_load(p, device) for p in paths], prompts, settings, cfg.strategies)
    except ValueError as e:
        raise SystemExit(f"nanollada compare: {e}")
    print(format_table(result))
    if cfg.output:
        with open(cfg.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False, indent=1)
        print(f"wrote {cfg.output}")


COMMANDS = {"tokenizer": tokenizer_command, "compare": compare_command}  # predict: see cli.main


def export_command(argv: list[str]) -> None:
    """export a checkpoint to model.safetensors + config.json + tokenizer.model (loadable without Lightning)"""
    parser = argparse.ArgumentParser(prog="nanollada export", description=export_command.__doc__)
    parser.add_argument("--ckpt", required=True, help="a nanollada checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="directory to write (created if needed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: keep the checkpoint's dtype)")
    args = parser.parse_args(argv)
    from nanollada.export import export_checkpoint, load_exported
    try:
        out = export_checkpoint(args.ckpt, args.output, args.dtype)
        loaded = load_exported(out)  # read it back once: a broken export fails here, not at the user's site
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    print(f"wrote {out}/model.safetensors, config.json, tokenizer.model ({loaded.paradigm}, "
          f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M parameters, vocab "
          f"{loaded.tokenizer.vocab_size}); load with nanollada.export.load_exported({str(out)!r})")


COMMANDS["export"] = export_command


def _eval_generate(args) -> None:
    """``nanollada eval --generate``: generation quality against speed (``evaluation.generation``)."""
    import json
    import sys

    from nanollada.data.records import DataError
    from nanollada.evaluation.generation import (base_settings, format_sweep, load_prompts, parse_sweep,
                                                 plot_sweep, run_sweep)
    from nanollada.evaluation.runner import EvalSettings, checkpoint_labels, default_cloze_strategies
    if not args.prompts:
        raise SystemExit("nanollada eval --generate: give --prompts (a .txt/.jsonl prompts file, an SFT file, a "
                         "pretrain file or ppl-<source>)")
    try:
        prompts, where = load_prompts(args.prompts, args.limit, args.prefix_chars, args.data_root, args.val_fraction)
        grid = parse_sweep(args.sweep or [])
        overrides = parse_sweep(args.set or [])
        if any(len(v) != 1 for v in overrides.values()):
            raise ValueError("--set takes one value per field (use --sweep for several)")
        settings = base_settings(args.max_new_tokens, **{k: v[0] for k, v in overrides.items()})
        scoring = EvalSettings(batch_size=args.batch_size, samples=8 if args.samples is None else args.samples,
                               seed=args.seed)
    except (DataError, ValueError) as e:
        raise SystemExit(f"nanollada eval --generate: {e}")
    print(f"[generate] prompts: {where}", file=sys.stderr)
    device = _device(args.device)
    models = [_load(p, device) for p in args.ckpt]
    judge = _load(args.judge, device) if args.judge else None
    strategies = default_cloze_strategies() if args.strategies is None else args.strategies
    try:
        result = run_sweep(models, checkpoint_labels(args.ckpt), prompts, settings, strategies, grid, judge, scoring,
                           log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise SystemExit(f"nanollada eval --generate: {e}")
    result["prompts_source"] = where
    print(format_sweep(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.plot and plot_sweep(result, args.plot):
        print(f"wrote {args.plot}", file=sys.stderr)


def eval_command(argv: list[str]) -> None:
    """score checkpoints on perplexity, minimal-pair, choice, cloze, raw-text and preference tasks, or --generate"""
    import json
    import sys

    from nanollada.data.records import DataError
    from nanollada.evaluation.runner import EvalSettings, format_markdown, run_eval
    from nanollada.evaluation.tasks import DEFAULT_DATA_ROOT, resolve_task
    parser = argparse.ArgumentParser(
        prog="nanollada eval", description=eval_command.__doc__,
        epilog="tasks: blimp, climp, chid, cmmlu (<data_root>/eval/<name>.jsonl.gz); ppl-<source>, e.g. "
               "ppl-en-gutenberg, ppl-zh-modern (validation records of <data_root>/pretrain/<source>.jsonl.gz); "
               "ppl:<pretrain file>; or a path to any jsonl(.gz) task file, whose family is detected from the first "
               'record: {"text"} perplexity, {"good","bad"} minimal pairs, {"query"|"context","choices","gold"} '
               'multiple choice, {"context_options","continuation","gold"} context choice (Winogrande), '
               '{"context","continuation"} cloze (LAMBADA); or a .txt file: rolling perplexity (token, word, byte) '
               "of its documents.")
    parser.add_argument("--ckpt", action="extend", nargs="+", required=True,
                        help="checkpoint(s); repeat or list several for a side-by-side table")
    parser.add_argument("--tasks", action="extend", nargs="+", default=None, help="task names or files")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N items per task, spread evenly over the file (shared round-robin over "
                             "phenomena/subjects first)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--samples", type=int, default=None,
                        help="Monte-Carlo samples of the diffusion estimators (default 8, and 32 for the multiple-"
                             "choice families, whose predictions are noisy with few draws); a value applies to all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the diffusion estimators")
    parser.add_argument("--stride", type=int, default=None,
                        help="texts longer than max_seq_len are scored in windows: tokens scored per window after "
                             "the first (default max_seq_len // 2)")
    parser.add_argument("--val_fraction", type=float, default=2 / 256,
                        help="ppl:<file> tasks score the records the SHA-1 split rule holds out at this fraction: "
                             "give the training config's data.val_fraction (default 2/256, the real configs'; "
                             "the tiny configs use 0.05)")
    parser.add_argument("--text_split", default="auto", choices=["auto", "blank", "heading", "file"],
                        help=".txt tasks: documents end at blank lines, start at headings (markdown '# ' or "
                             "WikiText ' = Title = '), or the file is one document; auto: heading if the file has one")
    parser.add_argument("--strategies", nargs="*", default=None,
                        help="the diffusion decoders of cloze tasks and of --generate (default: every registered "
                             "strategy; cloze: give none for only the one-block greedy continuation)")
    parser.add_argument("--data_root", default=None,
                        help=f"data directory (default: $NANOLLADA_DATA, else {DEFAULT_DATA_ROOT})")
    parser.add_argument("--output", default=None, help="JSON file for the full results")
    parser.add_argument("--markdown", default=None, help="markdown file for the table (+ per-phenomenon tables)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    gen = parser.add_argument_group("generation quality vs speed (--generate)")
    gen.add_argument("--generate", action="store_true",
                     help="instead of tasks: generate for --prompts with every decoder (--strategies) and sweep point "
                          "(--sweep), and report judge perplexity, unigram entropy, repeated-4-gram rate, mean "
                          "length, tokens per forward and tokens/s")
    gen.add_argument("--prompts", default=None,
                     help="a .txt (one prompt per line) or .jsonl ('prompt') file, an SFT file (first user turns), "
                          "sft:<file> or sft-<name> (first user turns of its held-out conversations only), a "
                          "pretrain file or ppl-<source> (prefixes of its validation records); --limit N of them")
    gen.add_argument("--judge", default=None, help="checkpoint whose perplexity of the generated text is reported")
    gen.add_argument("--sweep", action="extend", nargs="+", default=None, metavar="FIELD=V1,V2",
                     help="generation settings to sweep, e.g. threshold=0.5,0.7,0.9 steps=4,8,16 block_length=8,32 "
                          "(combinations a decoder ignores run once)")
    gen.add_argument("--set", action="extend", nargs="+", default=None, metavar="FIELD=V",
                     help="fixed generation settings (default: greedy, block_length 32, no prefix cache)")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--prefix_chars", type=int, default=120, help="length of pretraining-text prompts (characters)")
    gen.add_argument("--plot", default=None, help="PNG of quality against tokens/s (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.generate:
        _eval_generate(args)
        return
    if not args.tasks:
        parser.error("give --tasks (or --generate --prompts P)")
    try:
        settings = EvalSettings(batch_size=args.batch_size, samples=8 if args.samples is None else args.samples,
                                seed=args.seed, stride=args.stride,
                                choice_samples=32 if args.samples is None else args.samples)
        tasks = []
        for spec in args.tasks:
            tasks.append(resolve_task(spec, args.data_root, args.limit, args.text_split, args.val_fraction))
            t = tasks[-1]
            notes = "".join(f"; {lang} prompt {v['template']!r} + {v['delimiter']!r} + choice ({v['items']} items)"
                            for lang, v in t.notes.get("query_templates", {}).items())
            notes += f"; documents split at {t.notes['split']} lines" if t.family == "rolling_perplexity" else ""
            print(f"[eval] task {t.name}: {t.family}, {len(t.items)} items from {t.path}"
                  + (f" ({t.total} available)" if t.total and t.total > len(t.items) else "")
                  + (f", chance {t.chance:.1%}" if t.chance is not None else "") + notes, file=sys.stderr)
    except (DataError, ValueError) as e:
        raise SystemExit(f"nanollada eval: {e}")
    try:
        result = run_eval(args.ckpt, tasks, settings, _device(args.device), _load,
                          log=lambda m: print(m, file=sys.stderr), strategies=args.strategies)
    except ValueError as e:  # e.g. an unknown strategy, or a stride that does not fit max_seq_len
        raise SystemExit(f"nanollada eval: {e}")
    table = format_markdown(result)
    print(format_markdown(result, groups=False))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(table)
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, ensure_ascii=False, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)


COMMANDS["eval"] = eval_command


def prepare_command(argv: list[str]) -> None:
    """tokenize pretrain/SFT files into token caches once (from fit configs or a file list) and summarise them"""
    from nanollada.prepare import prepare_command as run
    run(argv)


def pipeline_command(argv: list[str]) -> None:
    """tokenizer -> AR pretrain -> diffusion from AR -> SFT -> DPO -> evaluation, resumable (scripts/pipeline.py)"""
    import importlib.util
    from pathlib import Path
    path = Path.cwd() / "scripts" / "pipeline.py"  # the checkout you are in, else the one nanollada came from
    if not (path.is_file() and (Path.cwd() / "configs").is_dir()):
        path = Path(__file__).resolve().parents[1] / "scripts" / "pipeline.py"
    if not path.is_file():
        raise SystemExit(f"nanollada pipeline needs the repository checkout ({path} not found)")
    spec = importlib.util.spec_from_file_location("nanollada_pipeline_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


COMMANDS["prepare"] = prepare_command
COMMANDS["pipeline"] = pipeline_command


def chat_command(argv: list[str]) -> None:
    """talk to a checkpoint of any paradigm: multi-turn, streaming, /set /reset /save (Ctrl-C stops an answer)"""
    from nanollada.chat import ChatREPL, ChatSession
    parser = _settings_parser("nanollada chat", chat_command.__doc__ + ". Settings left null take the paradigm's "
                              "defaults (AR: temperature 0.7, top-p 0.9, repetition penalty 1.1; diffusion: "
                              "threshold decoding with the prefix cache at temperature 1); --greedy true decodes "
                              "deterministically.",
                              prompts=False)
    parser.add_argument("--ckpt", type=str, required=True, help="a nanollada checkpoint (.ckpt)")
    parser.add_argument("--system", type=str | None, default=None, help="system prompt (chat checkpoints)")
    parser.add_argument("--show_denoising", type=bool, default=False,
                        help="diffusion: draw the live canvas at every denoising step instead of streaming text")
    cfg = parser.parse_args(argv)
    settings = _settings(cfg)
    loaded = _load(cfg.ckpt, _device(cfg.device))
    try:
        settings.resolve(loaded.interface.default_generation())
    except ValueError as e:
        raise SystemExit(str(e))
    ChatREPL(ChatSession(loaded, settings, cfg.system), show_denoising=cfg.show_denoising).run()


COMMANDS["chat"] = chat_command


def serve_command(argv: list[str]) -> None:
    """OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /"""
    from nanollada.serve import build_app, require_serve_extra
    require_serve_extra()
    import uvicorn
    parser = _settings_parser("nanollada serve", serve_command.__doc__ + ". The generation flags are the server's "
                              "defaults; each request may override temperature, top_p, max_tokens, seed, stop and, "
                              'under "nanollada": {...}, any other setting. Each model has a queue: its requests are '
                              "answered one at a time in arrival order; different models run side by side.",
                              prompts=False)
    parser.add_argument("--ckpt", action="append", type=str, required=True,
                        help="checkpoint to serve, as PATH or NAME=PATH (repeat for several; the model id is NAME, "
                             "else the run directory, e.g. tiny_ar_sft)")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    cfg = parser.parse_args(argv)
    settings = _settings(cfg)
    try:
        app = build_app(cfg.ckpt, settings, _device(cfg.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    for m in app.state.models.values():
        info = m.info()["nanollada"]
        print(f"[serve] model {m.id!r}: {info['paradigm']}, {'chat' if info['chat'] else 'pretraining'}, "
              f"{info['parameters'] / 1e6:.2f}M parameters, from {info['checkpoint']}", flush=True)
    print(f"[serve] http://{cfg.host}:{cfg.port}/ (chat page), http://{cfg.host}:{cfg.port}/v1 (OpenAI API); "
          "Ctrl-C stops", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=5)


COMMANDS["serve"] = serve_command


def merge_command(argv: list[str]) -> None:
    """average the weights of checkpoints of one run (top-k merge) into one normal checkpoint"""
    parser = argparse.ArgumentParser(prog="nanollada merge", description=merge_command.__doc__ + " (LLaDA 2.0 "
                                     "§4.3). Take the k best by val/ppl, e.g. a run's checkpoints/best/*.ckpt.")
    parser.add_argument("--ckpt", nargs="+", required=True, help="two or more checkpoints of one run")
    parser.add_argument("--output", required=True, help="the merged .ckpt to write (atomically)")
    args = parser.parse_args(argv)
    from nanollada.merge import merge_checkpoints
    try:
        meta = merge_checkpoints(args.ckpt, args.output)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanollada merge: {e}")
    print(f"wrote {args.output}: mean of {len(meta['merged_from'])} {meta['paradigm']} checkpoints (float32 average)")


COMMANDS["merge"] = merge_command


def lm_eval_command(argv: list[str]) -> None:
    """lm-evaluation-harness on a checkpoint: --model_args ckpt=C,... --tasks T (every lm-eval flag passes through)"""
    try:
        from nanollada.evaluation.lm_eval_adapter import main
    except ImportError as e:
        raise SystemExit(f"nanollada lm-eval needs lm-evaluation-harness ({e}): pip install 'nanollada[eval]'")
    main(argv)


COMMANDS["lm-eval"] = lm_eval_command
