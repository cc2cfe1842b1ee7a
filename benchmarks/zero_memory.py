"""Per-rank bytes of parameters, gradients, optimizer states and comm buffers under DeepSpeed ZeRO 0-3,
measured against what DeepSpeed 0.19.8 allocates (benchmarks.zero_memory_model) and against the ZeRO paper.

    python -m benchmarks.zero_memory [--hidden 256 --layers 4 --vocab 4096 --worlds 1 2 --stages 0 1 2 3
                                      --bucket-elements 200000]

For every (world size, stage) pair, `world` processes joined by torch.distributed (gloo) each build the
real raylm model (`training.model.build_model`) and engine (`training.engine.build_engine` over
`training.deepspeed_config.build_deepspeed_config`), run one full step so that Adam has states, then
measure the second step.

Bucket size: the benchmark sets reduce_bucket_size = allgather_bucket_size = 200,000 elements (stated
in its output) instead of raylm's default 50M: a bucket smaller than the model makes DeepSpeed reduce
during backward (several buckets, one gradient larger than the bucket), so every gradient term below
is exercised; raylm's default (`--bucket-elements 0`) holds every gradient in a 200 MB bucket.

Measurement: every tensor alive in the process (the garbage collector, plus the DeepSpeed attributes
that hold partitions) is reduced to its storage, so views into DeepSpeed's flat buffers count once and
their padding is included. Each storage is put in exactly one class by what refers to it (allocation,
not content):
  optimizer states  - tensors in the inner torch optimizer's `state` (exp_avg, exp_avg_sq, step)
  fp32 master       - the inner optimizer's own parameters, when they are not the model's weights
  parameters        - the model's weights (`param.data`, and `param.ds_tensor` under ZeRO-3)
  comm buffers      - DeepSpeed's reduce buckets (`ipg_buckets[..].buffer`), whatever they hold: a gradient
                      copied into the bucket is a view of it and is not counted again
  gradients         - every other gradient storage: `param.grad`, DeepSpeed's partition buffers
                      (`grads_in_partition`, `averaged_gradients`, `grad_partitions_flat_buffer`)
  other             - everything else (e.g. rotary `inv_freq` buffers)
Parameters and optimizer states are taken as held between steps (after backward). Gradients and comm
buffers are taken at their peak over DeepSpeed's reduction boundaries: end of backward, and before and
after every bucket reduction (the optimizer's `reduce_ipg_grads`, stage 3's
`__reduce_and_partition_ipg_grads`, wrapped on the instance for the measured step).

Expected bytes: benchmarks.zero_memory_model.expected_bytes, the paper's model states plus each buffer
DeepSpeed allocates for this config, each a named term with the DeepSpeed source line (its docstring;
the output lists the terms per row). The gradient peak is replayed from DeepSpeed's bucket rules over
the order in which DeepSpeed received the gradients in the measured step (recorded, an input like the
parameter shapes). `max_rel_dev` = the largest |measured / expected - 1| over every row and class.
The paper's formulas (Rajbhandari et al. 2020, Fig. 1, in fp32; K=12 when DeepSpeed keeps an fp32
master copy, which it does from stage 1 on even in fp32) are reported beside, as `paper_rel_dev`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path

from benchmarks.zero_memory_model import Param, expected_bytes, paper_bytes

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "zero_memory.json"
# reduce/allgather bucket in elements: smaller than the model and than its largest tensor (the 1M-element
# embedding at the default shape), so DeepSpeed reduces during backward and one gradient bypasses the bucket.
DEFAULT_BUCKET_ELEMENTS = 200_000
CLASSES = ("params", "grads", "optim_states", "fp32_master", "comm_buffers", "other")


def free_port() -> int:
    """A free TCP port on the loopback interface for the gloo rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_config(hidden: int, layers: int, heads: int, stage: int, micro_batch: int, seq_len: int):
    """A validated raylm PretrainConfig for a scratch Llama of the given shape and ZeRO stage."""
    from training.config import PretrainConfig

    return PretrainConfig.model_validate({
        "model": {"hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                  "max_position_embeddings": max(seq_len, 64)},
        # Never read: the engines here train on random token ids, no data preparation needed.
        "data": {"train_files": ["unused.txt"], "seq_len": seq_len},
        "optim": {"micro_batch_size": micro_batch, "max_steps": 10, "warmup_steps": 1},
        "deepspeed": {"zero_stage": stage, "precision": "fp32"},
    })


def _storage_key(tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the tensor's storage; None for empty or meta tensors."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0 or tensor.device.type == "meta":
        return None
    return storage.data_ptr(), storage.nbytes()


def _inner_torch_optimizer(engine):
    """The torch.optim.Optimizer that owns Adam's state, under DeepSpeed's ZeRO wrappers."""
    import torch

    opt = engine.optimizer
    for _ in range(5):
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            return opt
        opt = inner
    return opt


def _tensors_in(obj, depth: int = 0):
    """Tensors inside (nested lists/tuples/dicts of) an attribute value."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth + 1)


# DeepSpeed attributes (stage_1_and_2.py, stage3.py) that hold gradient partitions or reduce buckets.
_GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
               "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
_COMM_ATTRS = ("temp_grad_buffer_for_gpu_offload",)


def _bucket_buffers(zero_opt):
    """DeepSpeed's reduce-bucket buffers (stage 1/2: a list per dtype, stage 3: one tensor per dtype)."""
    for bucket in (getattr(zero_opt, "ipg_buckets", None) or {}).values():
        yield from _tensors_in(getattr(bucket, "buffer", None))
    for attr in _COMM_ATTRS:
        yield from _tensors_in(getattr(zero_opt, attr, None))


def classify_rank_bytes(engine, scan_gc: bool = True) -> dict[str, int]:
    """Bytes this process holds, per class (see module docstring); each storage counted once.

    `scan_gc=False` (the snapshots at reduction boundaries) skips the walk over every live object: the
    classes other than "other" are all found through the model and DeepSpeed's attributes.
    """
    import torch

    owner: dict[tuple[int, int], str] = {}

    def claim(tensor, cls: str) -> None:
        key = _storage_key(tensor) if tensor is not None else None
        if key is not None and key not in owner:
            owner[key] = cls

    zero_opt = engine.optimizer
    inner = _inner_torch_optimizer(engine)
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                claim(value, "optim_states")
    model_params = list({id(p): p for p in engine.module.parameters()}.values())
    model_storages = {_storage_key(t) for p in model_params for t in (p, getattr(p, "ds_tensor", None)) if t is not None}
    # ZeRO-3 swaps its fp32 partitions into the inner optimizer only during step(): read them directly too.
    masters = [p for g in inner.param_groups for p in g["params"]]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        masters += list(_tensors_in(getattr(zero_opt, attr, None)))
    for t in masters:
        if _storage_key(t) not in model_storages:
            claim(t, "fp32_master")
    for p in model_params:
        claim(p, "params")
        if getattr(p, "ds_tensor", None) is not None:
            claim(p.ds_tensor, "params")
    for t in _bucket_buffers(zero_opt):
        claim(t, "comm_buffers")
    grad_tensors = [p.grad for p in model_params + masters if p.grad is not None]
    for attr in _GRAD_ATTRS:
        grad_tensors += list(_tensors_in(getattr(zero_opt, attr, None)))
    for g in grad_tensors:
        claim(g, "grads")  # a view into a bucket buffer is already claimed by "comm_buffers"
    if scan_gc:
        gc.collect()
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    claim(obj, "other")
            except ReferenceError:  # a weakref proxy to a freed object
                continue
    totals = dict.fromkeys(CLASSES, 0)
    for (_, nbytes), cls in owner.items():
        totals[cls] += nbytes
    if not scan_gc:
        totals["other"] = None
    return totals


def _deepspeed_groups(engine, stage: int) -> list[list]:
    """The trainable params as DeepSpeed groups them, in its order: [[torch param, ...] per group]."""
    zero_opt = engine.optimizer
    if stage in (1, 2):
        return [list(g) for g in zero_opt.bit16_groups]
    if stage == 3:
        return [list(g) for g in zero_opt.fp16_groups]
    return [list(g["params"]) for g in _inner_torch_optimizer(engine).param_groups]


def _instrument_reductions(engine, stage: int, snapshots: list, reduce_order: list[int]):
    """Wrap, on this engine's instances only, DeepSpeed's per-gradient entry point (to record the order in
    which it receives gradients) and its bucket reduction (to snapshot before and after each); returns undo."""
    zero_opt = engine.optimizer
    undo = []

    def wrap(obj, name, make):
        original = getattr(obj, name)
        setattr(obj, name, make(original))
        undo.append(lambda: delattr(obj, name) if name in vars(obj) else None)

    if stage >= 1:
        def record(original):
            def wrapper(param, *a, **kw):
                reduce_order.append(id(param))
                return original(param, *a, **kw)
            return wrapper

        def snapshot_around(original):
            def wrapper(*a, **kw):
                count = sum(1 for label, _ in snapshots if label.startswith("before reduction"))
                snapshots.append((f"before reduction {count + 1}", classify_rank_bytes(engine, scan_gc=False)))
                out = original(*a, **kw)
                snapshots.append((f"after reduction {count + 1}", classify_rank_bytes(engine, scan_gc=False)))
                return out
            return wrapper

        wrap(zero_opt, "reduce_independent_p_g_buckets_and_remove_grads", record)
        reduce_name = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads" if stage == 3 else "reduce_ipg_grads"
        wrap(zero_opt, reduce_name, snapshot_around)

    def at_allreduce(original):
        def wrapper(*a, **kw):
            snapshots.append(("end of backward", classify_rank_bytes(engine)))
            return original(*a, **kw)
        return wrapper

    wrap(engine, "allreduce_gradients", at_allreduce)
    return lambda: [u() for u in undo]


def _measure_stage(stage: int, world: int, rank: int, args) -> dict:
    """Build the engine for one stage, train one step, measure after the second backward."""
    import torch

    from training.deepspeed_config import build_deepspeed_config
    from training.engine import build_engine
    from training.model import build_model, count_parameters

    cfg = make_config(args.hidden, args.layers, args.heads, stage, args.micro_batch, args.seq_len)
    model = build_model(cfg.model, args.vocab, pad_token_id=1, eos_token_id=0, seed=0)
    psi = count_parameters(model)
    ds_config = build_deepspeed_config(cfg, world)
    zero = ds_config["zero_optimization"]
    if args.bucket_elements and "reduce_bucket_size" in zero:
        zero.update(reduce_bucket_size=args.bucket_elements, allgather_bucket_size=args.bucket_elements)
    started = time.perf_counter()
    engine = build_engine(model, cfg, world, ds_config=ds_config)
    init_s = time.perf_counter() - started
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(2, args.vocab, (args.micro_batch, args.seq_len), generator=gen)
    started = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    first_step_s = time.perf_counter() - started

    # The measured step: snapshots at the end of backward and around every bucket reduction, and the
    # order in which DeepSpeed received the gradients (the input of the expected-bytes replay).
    snapshots: list[tuple[str, dict]] = []
    reduce_order: list[int] = []
    undo = _instrument_reductions(engine, stage, snapshots, reduce_order)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    del loss
    undo()
    after_backward = classify_rank_bytes(engine)
    snapshots.append(("after backward", after_backward))
    engine.step()
    # Parameters and optimizer states as held between steps (inside backward, ZeRO-3 also holds the
    # layers it has gathered: working memory like activations, not model state); gradients and comm
    # buffers at their peak over the snapshots.
    measured = dict(after_backward)
    peak_label, peak = max(snapshots, key=lambda item: item[1]["grads"])
    measured["grads"] = peak["grads"]
    measured["comm_buffers"] = max(snap["comm_buffers"] for _, snap in snapshots)
    index = {}
    groups = []
    for gi, group in enumerate(_deepspeed_groups(engine, stage)):
        groups.append([])
        for p in group:
            index[id(p)] = len(index)
            groups[-1].append([index[id(p)], int(getattr(p, "ds_numel", p.numel()))])
    persistent = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    record = {
        "stage": stage, "world": world, "rank": rank, "psi": psi, "measured": measured,
        "grad_peak_at": peak_label, "snapshots": [[label, snap] for label, snap in snapshots],
        "groups": groups, "reduce_order": [index[pid] for pid in reduce_order],
        "bucket_elements": zero.get("reduce_bucket_size", 0), "overlap_comm": bool(zero.get("overlap_comm", False)),
        "persistence_threshold": zero.get("stage3_param_persistence_threshold", 0),
        "init_s": init_s, "first_step_s": first_step_s,
        "stage3_persistent_params": len(persistent),
        "stage3_persistent_elements": sum(p.ds_numel for p in persistent),
    }
    engine.destroy()
    del engine, model
    gc.collect()
    return record


def _rank_main(rank: int, world: int, port: int, args, out_dir: str) -> None:
    """One rank: join the gloo group, measure every requested stage, write its records as JSON."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    records = [_measure_stage(stage, world, rank, args) for stage in args.stages]
    Path(out_dir, f"w{world}_r{rank}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def measure(args) -> list[dict]:
    """Run every (world, stage) and return one record per (world, stage, rank)."""
    import tempfile

    import torch.multiprocessing as mp

    records = []
    with tempfile.TemporaryDirectory(prefix="raylm-zero-mem-") as out_dir:
        for world in args.worlds:
            mp.spawn(_rank_main, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
            for rank in range(world):
                records += json.loads(Path(out_dir, f"w{world}_r{rank}.json").read_text())
    return records


COMPARED = ("params", "grads", "optim_states", "comm_buffers")


def _rel_dev(measured: float, expected: float) -> float:
    return 0.0 if measured == expected == 0 else (measured / expected - 1 if expected else float("inf"))


def compare(records: list[dict]) -> dict:
    """Per record: DeepSpeed's expected bytes with their terms, the paper's bytes, relative deviations.

    `rel_dev` (headline `max_rel_dev`): measured vs benchmarks.zero_memory_model.expected_bytes, per class
    (optimizer states include the fp32 master copy). `paper_rel_dev`: measured vs the paper's formula
    (K=12 when a master copy exists), which leaves out DeepSpeed's buffers and padding.
    """
    rows = []
    for rec in records:
        m, psi, world, stage = rec["measured"], rec["psi"], rec["world"], rec["stage"]
        groups = [[Param(pid, numel, gi) for pid, numel in group] for gi, group in enumerate(rec["groups"])]
        expected = expected_bytes(stage, world, rec["rank"], groups, rec["reduce_order"], rec["bucket_elements"],
                                  overlap_comm=rec["overlap_comm"], persistence_threshold=rec["persistence_threshold"])
        measured = {"params": m["params"], "grads": m["grads"], "optim_states": m["optim_states"] + m["fp32_master"],
                    "comm_buffers": m["comm_buffers"]}
        has_master = m["fp32_master"] > 0
        paper = paper_bytes(stage, psi, world, master=has_master)
        rows.append({
            **rec, "measured_compared": measured, "expected_bytes": expected["bytes"],
            "expected_terms": expected["terms"], "expected_grad_peak_at": expected["grad_peak_at"],
            "rel_dev": {k: _rel_dev(measured[k], expected["bytes"][k]) for k in COMPARED},
            "paper_bytes": paper, "paper_k": 12 if has_master else 8,
            "paper_rel_dev": {k: measured[k] / paper[k] - 1 for k in paper},
        })
    worst = lambda key: max(abs(v) for r in rows for v in r[key].values())  # noqa: E731
    return {"rows": rows, "max_rel_dev": worst("rel_dev"), "max_paper_rel_dev": worst("paper_rel_dev")}


def format_table(rows: list[dict]) -> str:
    """Rank-0 rows (all ranks where they differ) in MiB, measured / expected, then the expected terms."""
    mib = 2**20
    head = (f"{'world':>5} {'stage':>5} {'rank':>4} | {'params':>13} | {'grads':>13} | {'optim+master':>13} | "
            f"{'comm':>13} | {'max dev':>7} | {'grads vs paper':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, e = r["measured_compared"], r["expected_bytes"]
        cell = lambda k: f"{m[k] / mib:6.2f}/{e[k] / mib:6.2f}"  # noqa: E731
        lines.append(
            f"{r['world']:>5} {r['stage']:>5} {r['rank']:>4} | {cell('params'):>13} | {cell('grads'):>13} | "
            f"{cell('optim_states'):>13} | {cell('comm_buffers'):>13} | "
            f"{max(abs(v) for v in r['rel_dev'].values()):7.4f} | {r['paper_rel_dev']['grads']:+14.3f}"
        )
        for cls in ("grads", "params", "optim_states", "comm_buffers"):
            terms = " + ".join(f"{name} {v / mib:.2f}" for name, v in r["expected_terms"][cls].items())
            where = f" (peak: {r['expected_grad_peak_at']}; measured at {r['grad_peak_at']})" if cls == "grads" else ""
            lines.append(f"{'':>18} {cls}: {terms or '0'}{where}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--bucket-elements", type=int, default=DEFAULT_BUCKET_ELEMENTS,
                        help="DeepSpeed's reduce/allgather bucket size in elements (0 = raylm's config default)")
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results path ('' to skip writing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.zero_memory_model import SOURCES

    args = parse_args(argv)
    load_start, started = os.getloadavg(), time.time()
    result = compare(measure(args))
    bucket = max((r["bucket_elements"] for r in result["rows"]), default=0)  # stage 0 has no bucket
    result.update(
        bucket_elements=args.bucket_elements or "raylm default", reduce_bucket_size=bucket,
        model={"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": args.vocab,
               "seq_len": args.seq_len, "micro_batch": args.micro_batch, "psi": result["rows"][0]["psi"]},
        term_sources=SOURCES, precision="fp32", loadavg_start=load_start, loadavg_end=os.getloadavg(),
        wall_s=time.time() - started,
        unexplained=[f"w{r['world']} s{r['stage']} r{r['rank']} {k} {v:+.4f}" for r in result["rows"]
                     for k, v in r["rel_dev"].items() if abs(v) > 0.05],
    )
    print(format_table(result["rows"]))
    print("terms (DeepSpeed 0.19.8 source):")
    for name, source in SOURCES.items():
        print(f"  {name}: {source}")
    print(f"reduce_bucket_size = allgather_bucket_size = {bucket} elements "
          f"({'chosen by the benchmark' if args.bucket_elements else 'raylm default'}); "
          f"max deviation from the paper's formulas (no buffers, no padding): {result['max_paper_rel_dev']:.4f}")
    if result["unexplained"]:
        print("NOT explained by the terms (|dev| > 0.05): " + "; ".join(result["unexplained"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"max_rel_dev={result['max_rel_dev']:.4f} bucket_elements={bucket} "
          f"max_paper_rel_dev={result['max_paper_rel_dev']:.4f} psi={result['model']['psi']} "
          f"worlds={','.join(map(str, args.worlds))} stages={','.join(map(str, args.stages))} "
          f"load={load_start[0]:.2f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
