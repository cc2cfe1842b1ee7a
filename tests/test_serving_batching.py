"""Continuous batching in process (serving/scheduler.py on the tiny causal-LM export): requests that
join a running batch share its decode steps and each still gives its alone-output, equal to plain
transformers `generate`; mixed adapters and sampling settings in one batch; a cancelled request
leaves without disturbing the others; a full batch admits waiting requests first come first served."""

import asyncio
import threading

import pytest
from serving_fixtures import shared_exports

from serving.export_format import read_export


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return shared_exports(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(exports):
    import torch

    from serving.generation import CausalLMEngine

    torch.set_num_threads(1)
    engine = CausalLMEngine(read_export(exports["causal_lm"]), adapters_dir=str(exports["adapters"]))
    engine.load_adapter("finance")
    engine.load_adapter("support")
    return engine


@pytest.fixture(scope="module")
def hf_base(exports):
    """The export loaded by plain transformers (the engine's own model carries injected LoRA layers)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exports["causal_lm"]).eval()


def greedy(max_tokens: int):
    from serving.generation import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def job(engine, prompt: str, params, adapter=None):
    from serving.generation import GenerationJob

    return GenerationJob(engine.encode(prompt), params, adapter)


def hf_greedy(model, prompt_ids: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """Plain transformers greedy decoding of one prompt, cut at the first stop token (as the server does)."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0])
    ids = out[0, len(prompt_ids):].tolist()
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


class Driver:
    """Runs requests through a Scheduler; `hold()` parks the model thread between two steps so that
    arrivals provably join a batch that is mid-decode."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.gate = threading.Event()

    def hold(self):
        self.gate.clear()
        self.scheduler.call(self.gate.wait)

    def release(self):
        self.gate.set()

    async def collect(self, job, events=None, cancel_after: int | None = None):
        ids, text, count = [], [], 0
        stream = self.scheduler.events(job)
        async for event in stream:
            ids.extend(t for t in event.token_ids if t not in self.scheduler.engine.stop_token_ids)
            text.append(event.text_delta)
            count += 1
            if events is not None:
                events.set()
            if cancel_after is not None and count >= cancel_after:
                await stream.aclose()
                break
        return ids, "".join(text)


def decode_steps_with(scheduler, *jobs) -> int:
    keys = {id(j) for j in jobs}
    return sum(1 for record in scheduler.step_log if record.kind == "decode" and keys <= set(record.jobs))


def test_staggered_requests_join_mid_decode_and_equal_alone_and_hf_generate(engine, hf_base):
    from serving.scheduler import Scheduler

    prompts = ["The quick brown fox", "Hi", "def f(x): return x * 2 and then call it many times"]
    first, second, third = (job(engine, p, greedy(n)) for p, n in zip(prompts, (40, 12, 20)))
    scheduler = Scheduler(engine, max_batch_size=8)
    driver = Driver(scheduler)

    async def main():
        started = asyncio.Event()
        task_first = asyncio.create_task(driver.collect(first, started))
        await started.wait()  # the first request has its first token: it is decoding
        driver.hold()
        task_second = asyncio.create_task(driver.collect(second))
        await asyncio.sleep(0.05)
        in_flight = {(id(j), decoding) for j, decoding in scheduler.jobs_in_flight()}
        driver.release()
        await asyncio.sleep(0.01)
        driver.hold()
        task_third = asyncio.create_task(driver.collect(third))
        await asyncio.sleep(0.05)
        driver.release()
        return in_flight, await asyncio.gather(task_first, task_second, task_third)

    try:
        in_flight, results = asyncio.run(main())
    finally:
        scheduler.stop()
    assert in_flight == {(id(first), True), (id(second), False)}  # while parked: one decoding, one waiting to join
    jobs = (first, second, third)
    alone = [engine.generate([job(engine, p, j.params)])[0] for p, j in zip(prompts, jobs)]
    reference = [hf_greedy(hf_base, j.prompt_ids, j.params.max_tokens, engine.stop_token_ids) for j in jobs]
    assert [r[0] for r in results] == [a[0] for a in alone] == reference
    assert [r[1] for r in results] == [a[1] for a in alone]
    assert all(len(r[0]) > 0 for r in results)
    # Later arrivals joined the running batch: they prefilled on their own and then shared decode steps.
    kinds = [(r.kind, set(r.jobs)) for r in scheduler.step_log]
    assert kinds[0] == ("prefill", {id(first)})
    assert ("prefill", {id(second)}) in kinds and ("prefill", {id(third)}) in kinds
    assert decode_steps_with(scheduler, first, second) > 0
    assert decode_steps_with(scheduler, first, third) > 0 or decode_steps_with(scheduler, second, third) > 0


def test_a_burst_of_mixed_lengths_prefills_in_length_groups_and_equals_alone_and_hf_generate(engine, hf_base):
    from serving.decode_batch import PREFILL_PADDING_LIMIT, prefill_groups

    prompts = ["Hi", "The quick brown fox jumps over the lazy dog. " * 6, "one two three four five", "yes",
               "def f(x): return x * 2 " * 3, "ok then"]
    jobs = [job(engine, p, greedy(8)) for p in prompts]
    groups = prefill_groups(jobs)
    assert sorted(id(j) for group in groups for j in group) == sorted(id(j) for j in jobs)
    assert len(groups) > 1  # the long prompt is not padded together with "Hi"
    for group in groups:  # every group within its padding bound
        assert len(group) * max(len(j.prompt_ids) for j in group) <= PREFILL_PADDING_LIMIT * sum(len(j.prompt_ids) for j in group)
    together = engine.generate(jobs)  # one join: the groups prefill one by one and merge into one batch
    alone = [engine.generate([job(engine, p, greedy(8))])[0] for p in prompts]
    reference = [hf_greedy(hf_base, j.prompt_ids, 8, engine.stop_token_ids) for j in jobs]
    assert [t[0] for t in together] == [a[0] for a in alone] == reference
    assert [t[1] for t in together] == [a[1] for a in alone]


def test_mixed_adapters_and_sampling_in_one_running_batch_and_a_cancelled_row(engine, exports, hf_base):
    from peft import PeftModel

    from serving.generation import SamplingParams
    from serving.scheduler import Scheduler

    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, stop=("zz",))
    specs = [("The weather today is", greedy(30), None), ("Hello there", greedy(16), "finance"),
             ("我的订单什么时候发货", seeded, "support"), ("A long story about", greedy(30), None)]
    jobs = [job(engine, p, params, adapter) for p, params, adapter in specs]
    doomed = job(engine, "This one goes away", greedy(40), "finance")
    scheduler = Scheduler(engine, max_batch_size=8)
    driver = Driver(scheduler)

    async def main():
        started = asyncio.Event()
        tasks = [asyncio.create_task(driver.collect(jobs[0], started))]
        await started.wait()
        driver.hold()
        tasks.append(asyncio.create_task(driver.collect(doomed, cancel_after=3)))
        tasks += [asyncio.create_task(driver.collect(j)) for j in jobs[1:]]
        await asyncio.sleep(0.05)
        driver.release()
        return await asyncio.gather(*tasks)

    try:
        first, cancelled, *rest = asyncio.run(main())
    finally:
        scheduler.stop()
    results = [first, *rest]
    alone = [engine.generate([job(engine, p, params, adapter)])[0] for p, params, adapter in specs]
    assert [r[0] for r in results] == [a[0] for a in alone]
    assert [r[1] for r in results] == [a[1] for a in alone]
    assert len(cancelled[0]) < 40
    # The adapters changed the output, and they all shared decode steps with the cancelled row.
    assert alone[1][0] != engine.generate([job(engine, specs[1][0], specs[1][1])])[0][0]
    assert decode_steps_with(scheduler, jobs[0], jobs[1], jobs[2], doomed) > 0
    last_with_doomed = max(i for i, r in enumerate(scheduler.step_log) if id(doomed) in r.jobs)
    assert any(id(jobs[0]) in r.jobs for r in list(scheduler.step_log)[last_with_doomed + 1:])
    # An adapter row equals plain transformers generate on a PeftModel with that adapter alone.
    peft = PeftModel.from_pretrained(hf_base, exports["adapters"] / "finance").eval()
    assert results[1][0] == hf_greedy(peft, jobs[1].prompt_ids, 16, engine.stop_token_ids)


def test_a_full_batch_admits_waiting_requests_first_come_first_served(engine):
    from serving.scheduler import Scheduler

    prompts = ["one two three", "four five", "six seven eight nine", "ten", "eleven twelve"]
    jobs = [job(engine, p, greedy(6 + i)) for i, p in enumerate(prompts)]
    scheduler = Scheduler(engine, max_batch_size=2)
    driver = Driver(scheduler)

    async def main():
        driver.hold()
        tasks = []
        for j in jobs:
            tasks.append(asyncio.create_task(driver.collect(j)))
            await asyncio.sleep(0.01)  # arrival order
        held = scheduler.jobs_in_flight()  # the model thread is parked: every job waits, none decodes
        driver.release()
        done = await asyncio.gather(*tasks)
        return held, done

    try:
        held, results = asyncio.run(main())
    finally:
        scheduler.stop()
    assert sorted(id(j) for j, _ in held) == sorted(id(j) for j in jobs) and not any(decoding for _, decoding in held)
    assert scheduler.jobs_in_flight() == []  # all answered
    prefill_order = [job_id for r in scheduler.step_log if r.kind == "prefill" for job_id in r.jobs]
    assert prefill_order == [id(j) for j in jobs]
    assert max(len(r.jobs) for r in scheduler.step_log) == 2
    alone = [engine.generate([job(engine, p, j.params)])[0][0] for p, j in zip(prompts, jobs)]
    assert [r[0] for r in results] == alone
