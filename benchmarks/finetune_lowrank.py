"""Refinement training of importance-aware factors (issue 3's last step): SmolLM2-135M, all attention/MLP linears
factorized by one method at one ratio, then the factors trained on WikiText-2 train with next-token loss.

A control answers how much of the gain is only adaptation to WikiText-2: the dense model's same linears trained
the same way (same windows, steps, learning rate), evaluated on the same test tokens.

    python benchmarks/finetune_lowrank.py --method fwhiten --ratio 0.8 --windows 64 --steps 300 --tokens 16384
    python benchmarks/finetune_lowrank.py --recipe channels --windows 64 --steps 300 --distill
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

import lmshrink
from lmshrink.evaluate import corpus_perplexity

from _common import peak_rss_mib, write_results

DENSE_LINEARS = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="fwhiten")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--recipe", default=None, help="a recipe (built-in name or file) instead of --method/--ratio/--allocation; "
                        "--windows applies to every stage")
    parser.add_argument("--allocation", default="uniform", help="rank allocation of the compression (uniform, sensitivity)")
    parser.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--steps", type=int, default=300, help="training steps of one 512-token window")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--distill", action="store_true",
                        help="train toward the dense model's distributions (KL) instead of next-token loss; no control run "
                             "(the dense model distilled toward itself does not move)")
    parser.add_argument("--no-control", action="store_true", help="skip the dense control run")
    parser.add_argument("--name", default=None, help="results name (default finetune_<method>_<ratio>)")
    args = parser.parse_args()

    corpus = lmshrink.load_corpus("wikitext-2")
    pristine = lmshrink.load_model(args.model)

    def fresh():
        return lmshrink.LoadedModel(copy.deepcopy(pristine.model), pristine.family, pristine.tokenizer, pristine.source)

    def ppl(loaded):
        return corpus_perplexity(loaded, corpus, args.tokens, 512, progress=False)["perplexity"]

    dense_ppl = ppl(pristine)
    rows, payload = [["dense", "-", "-", f"{dense_ppl:.3f}", "1.00", "-"]], {"dense_perplexity": dense_ppl}
    loaded = fresh()
    if args.recipe:
        from lmshrink.recipes import apply_recipe, combined_report, load_recipe

        recipe = load_recipe(args.recipe)
        recipe = dataclasses.replace(recipe, stages=[dataclasses.replace(s, calibration_windows=args.windows) for s in recipe.stages])
        args.method, args.allocation, plan = f"recipe-{recipe.name or 'file'}", "recipe", None
        report = combined_report(apply_recipe(loaded, recipe, data=corpus, progress=False))
    else:
        plan = lmshrink.Plan(method=args.method, ratio=args.ratio, allocation=args.allocation, calibration_windows=args.windows)
        report = lmshrink.compress(loaded, plan, data=corpus, progress=False)
    compressed_ppl = ppl(loaded)
    print(f"{args.method} {args.ratio}: {compressed_ppl:.3f}", flush=True)
    rows.append([args.method, args.ratio, 0, f"{compressed_ppl:.3f}", f"{compressed_ppl / dense_ppl:.2f}", f"{report.seconds:.0f}"])
    tuned = lmshrink.finetune(loaded, corpus, steps=args.steps, lr=args.lr, teacher=pristine if args.distill else None,
                              progress=False)
    tuned_ppl = ppl(loaded)
    print(f"{args.method} {args.ratio} + {args.steps} steps: {tuned_ppl:.3f} ({tuned['seconds']:.0f} s)", flush=True)
    rows.append([f"{args.method} + {'distillation' if args.distill else 'refinement'}", args.ratio, args.steps, f"{tuned_ppl:.3f}", f"{tuned_ppl / dense_ppl:.2f}",
                 f"{tuned['seconds']:.0f}"])
    payload.update(loss=tuned["loss"], method=args.method, ratio=args.ratio, allocation=args.allocation, max_shift=plan and plan.max_shift, recipe=args.recipe, calibration_windows=args.windows, lr=args.lr, steps=args.steps,
                   eval_tokens=args.tokens, params_before=report.params_before, params_after=report.params_after,
                   compress_seconds=report.seconds, compressed_perplexity=compressed_ppl, tuned_perplexity=tuned_ppl,
                   train_seconds=tuned["seconds"], trained_parameters=tuned["trained_parameters"], losses=tuned["losses"])
    del loaded
    if not (args.no_control or args.distill):
        control = fresh()
        trained = lmshrink.finetune(control, corpus, steps=args.steps, lr=args.lr, train=DENSE_LINEARS, progress=False)
        control_ppl = ppl(control)
        print(f"dense control + {args.steps} steps: {control_ppl:.3f}", flush=True)
        rows.append(["dense control + same training", "-", args.steps, f"{control_ppl:.3f}", f"{control_ppl / dense_ppl:.2f}",
                     f"{trained['seconds']:.0f}"])
        payload.update(control_perplexity=control_ppl, control_losses=trained["losses"], control_seconds=trained["seconds"])
    payload["peak_rss_mib"] = peak_rss_mib()
    write_results(
        args.name or f"finetune_{args.method}_{args.ratio:g}" + ("" if args.allocation == "uniform" else f"_{args.allocation}")
        + ("_distill" if args.distill else ""), payload,
        ["model", "ratio", "train steps", f"ppl ({args.tokens} tok)", "x dense", "seconds"], rows,
        [(f"SmolLM2-135M, the linears by the recipe {args.recipe!r} (its stages: {args.recipe} in lmshrink.recipes)" if args.recipe else
          f"SmolLM2-135M, all 210 attention/MLP linears, {args.allocation} rank allocation"
          + (f" (max_shift {plan.max_shift})" if args.allocation != "uniform" else "")) + f"; calibration {args.windows} windows of 512 tokens from WikiText-2 "
         f"train; evaluation WikiText-2 test, first {args.tokens} tokens, non-overlapping windows of 512.",
         f"Refinement: lmshrink.finetune, AdamW lr {args.lr}, {args.steps} steps of one 512-token window from the start "
         f"of WikiText-2 train ({args.steps * 512} tokens), factors only ({payload['trained_parameters']:,} parameters), "
         f"loss: {tuned['loss']}.",
         *(["Control: the uncompressed model's same 210 linears trained with the same windows, steps and lr; it "
            "separates recovery of what compression lost from plain adaptation to WikiText-2."]
           if "control_perplexity" in payload else
           ["No control: the teacher is the uncompressed model itself, so the target is what compression lost, not "
            "WikiText-2."] if args.distill else []),
         f"Params: {report.params_before:,} -> {report.params_after:,}. Peak RSS {payload['peak_rss_mib']:.0f} MiB."],
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
