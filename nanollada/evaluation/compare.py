"""Side-by-side comparison of checkpoints of any paradigms on the same prompts (v0.1.0's ``eval_sft_one_prompt``,
made fair).

Every model gets the same prompts and settings; each runs once per decoding strategy that applies to it (its
paradigm's ``comparison_runs``: AR once, diffusion once per requested strategy). Reported per run: completion,
answer tokens, forwards, tokens per forward, first-token (AR) / first-round (diffusion) latency, total latency,
generated tokens/s (every position produced, diffusion's whole canvas included) and effective tokens/s (answer
tokens before the stop token).
"""

from __future__ import annotations

from dataclasses import replace

from nanollada.generate import GenerationSettings, generate_text
from nanollada.loading import LoadedModel


def compare(models: list[LoadedModel], prompts: list[str], settings: GenerationSettings,
            strategies: list[str]) -> dict:
    """Run every model on every prompt; returns {"checkpoints", "prompts", "runs", "summary"} (JSON-ready)."""
    configs = [(name, m, cfg) for m in models for name, cfg in m.interface.comparison_runs(settings, strategies)]
    names = [c[0] for c in configs]
    if len(set(names)) < len(names):  # two checkpoints of one paradigm: tell them apart by position
        configs = [(f"{name} #{models.index(m) + 1}", m, cfg) for name, m, cfg in configs]
    for m in models:  # warm-up: first-call overheads
        generate_text(m, prompts[0], replace(settings, max_new_tokens=2, block_length=2))
    runs, summary = [], []
    for name, loaded, cfg in configs:
        recs = [dict(generate_text(loaded, p, cfg), run=name) for p in prompts]
        runs += recs
        secs = sum(r["seconds"] for r in recs)
        summary.append({
            "run": name, "checkpoint": loaded.path, "prompts": len(recs),
            "answer_tokens": sum(r["tokens"] for r in recs),
            "generated_tokens": sum(r["generated_tokens"] for r in recs), "forwards": sum(r["forwards"] for r in recs),
            "first_token_s": sum(r["first_token_seconds"] for r in recs) / len(recs), "seconds": secs,
            "generated_tok_s": sum(r["generated_tokens"] for r in recs) / max(secs, 1e-9),
            "effective_tok_s": sum(r["tokens"] for r in recs) / max(secs, 1e-9),
            "tokens_per_forward": sum(r["tokens"] for r in recs) / max(1, sum(r["forwards"] for r in recs)),
        })
    return {"checkpoints": [m.path for m in models], "prompts": prompts, "runs": runs, "summary": summary}


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
