"""How a changed model (int8, pruned, healed) compares with its reference: quality on text and decode speed.

Shared by the quantization and pruning benchmarks and by `python -m training.prune`'s report, so
every figure of that kind is measured one way:
- greedy next-token agreement: the fraction of teacher-forced positions on held-out text where the
  candidate picks the same argmax token as the reference;
- perplexity: exp of the mean next-token cross-entropy over the same kind of text;
- tokens/s: a whole greedy run (prefill + decode) of a batch through serving's own decode loop.
"""

from __future__ import annotations

import math
import time


def greedy_agreement(reference, candidate, tokenizer, texts: list[str], max_len: int = 128) -> tuple[float, int]:
    """(share of positions where both models' greedy next token agree, positions compared)."""
    import torch

    same = total = 0
    with torch.inference_mode():
        for ids in token_rows(tokenizer, texts, max_len):
            a = reference(input_ids=ids).logits.argmax(-1)
            b = candidate(input_ids=ids).logits.argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
    return same / max(total, 1), total


def perplexity(model, tokenizer, texts: list[str], max_len: int = 128) -> tuple[float, int]:
    """(exp of the mean next-token loss over every predicted position of `texts`, positions scored)."""
    import torch

    loss_sum, count = 0.0, 0
    with torch.inference_mode():
        for ids in token_rows(tokenizer, texts, max_len):
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss_sum += float(loss)
            count += ids.shape[1] - 1
    return math.exp(loss_sum / max(count, 1)), count


def token_rows(tokenizer, texts: list[str], max_len: int):
    """One [1, <=max_len] tensor of token ids per text (texts may also be lists of ids)."""
    import torch

    for text in texts:
        ids = text if isinstance(text, list) else tokenizer(text)["input_ids"]
        yield torch.tensor([ids[:max_len]])


def timed_run(engine, prompts: list[str], batch: int, tokens: int) -> dict[str, float]:
    """One greedy run of `batch` prompts through serving's decode loop, `tokens` tokens each (stop tokens
    suppressed, so every engine decodes exactly the same length). The prefill (prompt forward + first
    token) and the decode steps are timed separately; `tok_s` counts both, on every side alike."""
    from serving.generation import GenerationJob, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    jobs = [GenerationJob(engine.encode(p), params) for p in (prompts * batch)[:batch]]
    running = engine.start_batch()
    started = time.perf_counter()
    running.join(jobs)
    prefilled = time.perf_counter()
    steps = 0
    while running.size:
        running.decode()
        steps += 1
    ended = time.perf_counter()
    if steps != tokens - 1:
        raise RuntimeError(f"the decode loop ran {steps} steps for {tokens} tokens; the timing would be wrong")
    return {"prefill_ms": (prefilled - started) * 1000, "decode_tok_s": batch * steps / (ended - prefilled),
            "tok_s": batch * tokens / (ended - started)}
