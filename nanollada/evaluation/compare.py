"""One-prompt comparison of an AR and a diffusion checkpoint (v0.1.0's ``eval_sft_one_prompt``, made fair).

Both models get the same prompts and settings; AR runs once, diffusion once per strategy. Reported per run:
completion, answer tokens, forwards, tokens per forward, first-token (AR) / first-round (diffusion) latency, total
latency, generated tokens/s (every position produced, diffusion's whole canvas included) and effective tokens/s
(answer tokens before the stop token).
"""

from __future__ import annotations

from dataclasses import replace

from nanollada.generate import GenerationSettings, generate_text
from nanollada.loading import LoadedModel


def compare(ar: LoadedModel, diffusion: LoadedModel, prompts: list[str], settings: GenerationSettings,
            strategies: list[str]) -> dict:
    """Run both models on every prompt; returns {"runs": [...], "summary": [...]} (JSON-ready)."""
    if ar.paradigm != "ar" or diffusion.paradigm != "diffusion":
        raise SystemExit(f"--ar needs an AR checkpoint (got {ar.paradigm}), --diffusion a diffusion checkpoint "
                         f"(got {diffusion.paradigm})")
    configs = [("ar", ar, settings)] + [(f"diffusion/{s}", diffusion, replace(settings, strategy=s))
                                        for s in strategies]
    generate_text(ar, prompts[0], replace(settings, max_new_tokens=2))  # warm-up: first-call overheads
    runs, summary = [], []
    for name, loaded, cfg in configs:
        recs = [dict(generate_text(loaded, p, cfg), run=name) for p in prompts]
        runs += recs
        secs = sum(r["seconds"] for r in recs)
        summary.append({
            "run": name, "prompts": len(recs), "answer_tokens": sum(r["tokens"] for r in recs),
            "generated_tokens": sum(r["generated_tokens"] for r in recs), "forwards": sum(r["forwards"] for r in recs),
            "first_token_s": sum(r["first_token_seconds"] for r in recs) / len(recs), "seconds": secs,
            "generated_tok_s": sum(r["generated_tokens"] for r in recs) / max(secs, 1e-9),
            "effective_tok_s": sum(r["tokens"] for r in recs) / max(secs, 1e-9),
            "tokens_per_forward": sum(r["tokens"] for r in recs) / max(1, sum(r["forwards"] for r in recs)),
        })
    return {"ar": ar.path, "diffusion": diffusion.path, "prompts": prompts, "runs": runs, "summary": summary}


def format_table(result: dict) -> str:
    """Completions side by side per prompt, then the speed table (markdown)."""
    lines = []
    for p in result["prompts"]:
        lines.append(f"### {p}")
        for r in (r for r in result["runs"] if r["prompt"] == p):
            lines.append(f"- **{r['run']}** ({r['tokens']} tokens, {r['forwards']} forwards, {r['seconds']:.2f}s): "
                         + r["completion"].replace("\n", " ⏎ "))
        lines.append("")
    lines.append("| run | answer tokens | forwards | tokens/forward | first token/round (s) | total (s) "
                 "| generated tok/s | effective tok/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in result["summary"]:
        lines.append(f"| {s['run']} | {s['answer_tokens']} | {s['forwards']} | {s['tokens_per_forward']:.2f} | "
                     f"{s['first_token_s']:.3f} | {s['seconds']:.2f} | {s['generated_tok_s']:.1f} | "
                     f"{s['effective_tok_s']:.1f} |")
    return "\n".join(lines)
