"""Measure a real pretrained model's task behaviour on lsa's prompts with plain transformers (for its card).

    python scripts/pretrained_behaviour.py gemma-3-270m [--n 200] [--bos]

Builds IOI and past-tense prompts with ``lsa.tasks.build`` (English and Chinese),
runs the Hugging Face model itself (no lsa hooks) and prints, per task and
language: prompts kept / requested, the builder's drop reasons, accuracy
(logit difference > 0), top-1 accuracy (the answer is the argmax) and the mean
logit difference, clean and counterfactual. Prompts are right-padded, so the
end position's logits need no attention mask. (Neither model soft-caps its
logits, so ``lm_head`` of the final hidden state is the model's output.)
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(name: str, n: int, bos: bool, batch_size: int = 32) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lsa import pretrained, tasks

    path = str(pretrained.folder(name))
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for task in ("ioi", "past_tense"):
        for language in ("en", "zh"):
            start = time.perf_counter()
            try:
                prompts = tasks.build(task, language, tokenizer, n=n, prepend_bos=bos)
            except ValueError as err:  # too few usable names / verbs for this tokenizer
                rows.append(dict(task=task, language=language, n=0, note=str(err)[:160]))
                continue
            diffs, corrupt_diffs, top1 = [], [], []
            for s in range(0, len(prompts), batch_size):
                chunk = prompts.subset(slice(s, s + batch_size))
                rows_ = torch.arange(len(chunk))
                with torch.no_grad():  # the model's own modules; unembed only the end positions (262k vocabulary)
                    clean = hf.lm_head(hf.model(chunk.clean).last_hidden_state[rows_, chunk.end])
                    corrupt = hf.lm_head(hf.model(chunk.corrupt).last_hidden_state[rows_, chunk.end])
                for logits, out in ((clean, diffs), (corrupt, corrupt_diffs)):
                    out.append(logits[rows_, chunk.answer] - logits[rows_, chunk.distractor])
                top1.append(clean.argmax(-1) == chunk.answer)
            diff, cdiff, top = torch.cat(diffs), torch.cat(corrupt_diffs), torch.cat(top1)
            rows.append(
                dict(
                    task=task,
                    language=language,
                    n=len(prompts),
                    requested=n,
                    accuracy=round(float((diff > 0).float().mean()), 3),
                    top1=round(float(top.float().mean()), 3),
                    logit_diff=round(float(diff.mean()), 2),
                    logit_diff_corrupt=round(float(cdiff.mean()), 2),
                    seconds=round(time.perf_counter() - start, 1),
                    note=str(prompts.report).replace("\n", "; ")[:300],
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token to every prompt")
    args = parser.parse_args()
    import pandas as pd

    frame = pd.DataFrame(measure(args.name, args.n, args.bos))
    with pd.option_context("display.width", 250, "display.max_colwidth", 300):
        print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
