"""What DeepSpeed 0.19.8 allocates per rank under ZeRO 0-3: the formula benchmarks.zero_memory measures against.

Pure functions, no torch. Every term names the DeepSpeed source that allocates it (paths under
deepspeed/runtime/zero/ of deepspeed 0.19.8). The config is raylm's on CPU (training.deepspeed_config):
fp32, contiguous_gradients=True, overlap_comm=False, reduce_scatter=True, torch AdamW, no offload.

The paper's model states (Rajbhandari et al. 2020) are the first term of each class; DeepSpeed adds:

params (between steps)
  stage 0      4*Psi                                   the model's own tensors
  stage 1, 2   4*sum_g align(n_g + pad_g, 2N)           stage_1_and_2.py:446 (`aligned_numel`): each param group is
                                                        flattened into one buffer padded to 2N elements; params are views
  stage 3      4*sum_p ceil(n_p/N)                      partition_parameters.py:1816 (`_aligned_size // world`): ds_tensor
               + 4*sum_{p persistent} n_p  (N > 1)      parameter_offload.py:317 mark_persistent_parameters: a param with
                                                        n_p <= stage3_param_persistence_threshold (ds_persist) keeps its
                                                        gathered full data between steps; at N = 1 the "gathered" data
                                                        is a view of the partition (partition_parameters.py:1559
                                                        _no_gather_coalesced -> NoGatherHandle, :74)
optimizer states (Adam moments + fp32 master, K=12 in the paper's terms)
  stage 0      8*Psi + 4 per param tensor               torch AdamW exp_avg, exp_avg_sq and a 0-dim fp32 `step` per tensor
  stage 1-3    12*P + 4 per param group                 P = this rank's padded partition (stage_1_and_2.py:586
                                                        partition_size): the fp32 master copy, kept even in fp32
                                                        training (stage_1_and_2.py:577 single_partition_of_fp32_groups,
                                                        stage3.py:1155 fp32_partitioned_groups_flat) + 2 Adam moments
comm buffers (allocated by config, not by the model)
  stage 1, 2   4*reduce_bucket_size*(2 if overlap_comm else 1)   stage_1_and_2.py:3266/3275 setup_buckets, at the first
                                                        gradient hook; freed by the epilogue (_release_ipg_buffers, :924)
  stage 3      4*reduce_bucket_size                     stage3.py:782, allocated at init and kept
gradients: the peak over DeepSpeed's reduction boundaries (before and after every bucket reduction), replayed
  by `gradient_points` from DeepSpeed's rules over the order in which it received the gradients:
  - partition buffer, stage 1/2: 4*sum of n_p over the params that overlap this rank's partition, whole
    (stage_1_and_2.py:2186-2192 `total_size += param_in_partition.numel()`, get_partition_info :2579 counts a
    param that straddles the partition boundary on both ranks), allocated at the first copy into it
    (copy_grads_in_partition) and kept until step() through `averaged_gradients`;
    stage 3: 4*sum_p ceil(n_p/N) (stage3.py:791 grad_partitions_flat_buffer, allocated at init).
  - gradients not yet reduced: autograd's own full-size gradient of every param whose hook has fired and
    whose gradient was not copied into the bucket. Stage 1 reduces only after backward (engine
    allreduce_gradients -> reduce_gradients, stage_1_and_2.py:958), so all of them (4*Psi) are alive when
    the partition buffer is allocated next to them.
  - a gradient larger than the bucket bypasses it (stage_1_and_2.py:1443 `extra_large_param_to_reduce`,
    stage3.py:1626 copies only what fits) and stays in its own tensor until the next reduction: with tied
    embeddings, the embedding's gradient is the last of backward, so it is held next to the full
    partition buffer until the epilogue reduces it.
  Gradients copied into the bucket live in the comm buffer's memory and are not counted again.
Not modelled (transient inside one reduction, between the boundaries): the source gradient and its copy
in the partition buffer coexist for one parameter's copy; reduce-scatter temporaries (stage 3
`reduce_scatter_coalesced`); autograd's accumulation buffer for a tied weight during backward. Stage 3's
gathered parameters during forward/backward (prefetch bucket, max_live_parameters) are working memory
like activations: parameters are compared as held between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FP32 = 4
SOURCES = {
    "model_params": "the model's own fp32 tensors (stage 0: no flattening)",
    "flat_param_groups": "stage_1_and_2.py:446 aligned_numel: each param group flattened, padded to 2N elements",
    "param_partitions": "partition_parameters.py:1816 ds_tensor of ceil(n/N) elements per param",
    "persistent_params": "parameter_offload.py:317 ds_persist: params with n <= stage3_param_persistence_threshold "
                         "keep their gathered full data (N > 1; at N = 1 it is a view of the partition, "
                         "partition_parameters.py:1559/:74)",
    "adam_moments": "torch AdamW exp_avg + exp_avg_sq over what the inner optimizer updates",
    "adam_step": "torch AdamW 0-dim fp32 `step` per optimized tensor",
    "fp32_master": "stage_1_and_2.py:577 single_partition_of_fp32_groups / stage3.py:1155 fp32_partitioned_groups_flat: "
                   "fp32 master partition, kept even in fp32 training",
    "reduce_bucket": "stage_1_and_2.py:3266 setup_buckets (x2 with overlap_comm, :3275) / stage3.py:782 ipg bucket "
                     "buffer, reduce_bucket_size elements",
    "full_grads": "autograd's full-size gradients of every param (stage 0; stage 1 until reduce_gradients)",
    "grad_partition_buffer": "stage_1_and_2.py:2186 grads_in_partition: sum of whole params overlapping the partition "
                             "/ stage3.py:791 grad_partitions_flat_buffer: sum ceil(n/N)",
    "unreduced_grads": "autograd gradients whose hook fired (stage 1: all of backward) and not yet copied "
                       "into the bucket or reduced",
    "bypassing_grad": "stage_1_and_2.py:1443 extra_large_param_to_reduce / stage3.py:1626: a gradient larger than "
                      "reduce_bucket_size is kept in its own tensor until the next reduction",
}


@dataclass
class Param:
    """One trainable tensor as DeepSpeed sees it: an id, its element count, its param group."""

    pid: int
    numel: int
    group: int = 0


@dataclass
class GradPoint:
    """Gradient bytes held at one reduction boundary, split into named terms (bytes)."""

    label: str
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def stage12_layout(groups: list[list[Param]], world: int, rank: int, param_alignment: int = 4):
    """(padded group sizes, partition size per group, pids of params overlapping `rank`'s partition).

    stage_1_and_2.py:440-446: per group, params padded to `param_alignment` elements (16 bytes / fp32) except
    the last, the group to 2N (nccl_start_alignment_factor 2 x world); partition = len // N
    (:586); get_partition_info (:2579): a param belongs to a partition when it starts inside it, or
    starts before it and ends inside it (a straddling param belongs to both).
    """
    padded, partition, in_partition = [], [], set()
    for params in groups:
        total = sum(p.numel for p in params)
        max_pad = sum((-p.numel) % param_alignment for p in params)
        aligned = math.ceil((total + max_pad) / (2 * world)) * (2 * world)
        size = aligned // world
        padded.append(aligned)
        partition.append(size)
        start, end, offset = size * rank, size * (rank + 1), 0
        for index, p in enumerate(params):
            if start <= offset < end or offset < start < offset + p.numel:
                in_partition.add(p.pid)
            pad = 0 if index == len(params) - 1 else (-(offset + p.numel)) % param_alignment
            offset += p.numel + pad
    return padded, partition, in_partition


def gradient_points(stage: int, world: int, rank: int, groups: list[list[Param]], reduce_order: list[int],
                    bucket: int) -> list[GradPoint]:
    """Replay DeepSpeed's bucketed reduction (contiguous_gradients, no overlap_comm) and return the gradient
    bytes at every boundary: end of backward, before and after every bucket reduction.

    `reduce_order` is the order of pids in which DeepSpeed's per-gradient entry point
    (`reduce_independent_p_g_buckets_and_remove_grads`) received them: the backward hook order for
    stages 2-3, the param-group order of reduce_gradients for stage 1.
    """
    params = {p.pid: p for g in groups for p in g}
    if stage == 0:
        return [GradPoint("end of backward", {"full_grads": FP32 * sum(p.numel for p in params.values())})]
    if stage == 3:
        partition_buffer = FP32 * sum(math.ceil(p.numel / world) for p in params.values())
        in_partition = set(params)
    else:
        _, _, in_partition = stage12_layout(groups, world, rank)
        partition_buffer = FP32 * sum(params[pid].numel for pid in in_partition)
    buffer_allocated = stage == 3          # stage3.py:791 at init; stage 1/2 at the first copy (:2192)
    own = set(params) if stage == 1 else set()   # pids whose gradient is its own autograd tensor
    bucket_pids: list[int] = []
    bucket_elements = 0
    bypassing: set[int] = set()
    points: list[GradPoint] = []

    def snapshot(label: str) -> None:
        terms = {"grad_partition_buffer": partition_buffer if buffer_allocated else 0,
                 "unreduced_grads": FP32 * sum(params[q].numel for q in own - bypassing),
                 "bypassing_grad": FP32 * sum(params[q].numel for q in own & bypassing)}
        points.append(GradPoint(label, terms))

    def flush(label: str) -> None:
        nonlocal buffer_allocated, bucket_elements
        snapshot(f"before {label}")
        for q in bucket_pids:
            if stage == 3:              # partition_grads (stage3.py:2006): copy the partition, param.grad = None
                own.discard(q)
            elif q in in_partition:     # copy_grads_in_partition: allocate on first use, copy, free the source
                buffer_allocated = True
                own.discard(q)
            elif stage == 2:            # clear_grad_attribute for params of other partitions
                own.discard(q)
            # stage 1, other partition: param.grad keeps its own tensor if it bypassed the bucket
        bypassing.difference_update(q for q in bucket_pids if q not in own)
        bucket_pids.clear()
        bucket_elements = 0
        snapshot(f"after {label}")

    if stage == 1:
        snapshot("end of backward")
    for pid in reduce_order:
        numel = params[pid].numel
        if stage >= 2:
            own.add(pid)                # the hook fires once autograd has written param.grad
        # stage_1_and_2.py:1422 / stage3.py:1583: reduce the bucket first when this gradient does not fit
        # (stage 1/2 also "reduce" an empty bucket there; stage 3 only a non-empty one)
        if bucket_elements + numel > bucket and (stage < 3 or bucket_elements > 0):
            flush(f"reduction {sum(p.label.startswith('before reduction') for p in points) + 1}")
        if numel > bucket:
            bypassing.add(pid)          # kept in its own tensor
        else:
            own.discard(pid)            # copied into the bucket, autograd's tensor freed (param.grad is a view)
        bucket_pids.append(pid)
        bucket_elements += numel
    if stage >= 2:
        snapshot("end of backward")
    flush(f"reduction {sum(p.label.startswith('before reduction') for p in points) + 1}")  # the epilogue's
    return points


def expected_bytes(stage: int, world: int, rank: int, groups: list[list[Param]], reduce_order: list[int],
                   bucket: int, overlap_comm: bool = False, persistence_threshold: int = 0) -> dict:
    """Per class, the bytes DeepSpeed allocates on `rank` ({class: bytes}) and the named terms of each."""
    params = [p for g in groups for p in g]
    psi = sum(p.numel for p in params)
    terms: dict[str, dict[str, int]] = {}
    if stage == 0:
        terms["params"] = {"model_params": FP32 * psi}
        terms["optim_states"] = {"adam_moments": 2 * FP32 * psi, "adam_step": FP32 * len(params)}
        terms["comm_buffers"] = {}
    elif stage in (1, 2):
        padded, partition, _ = stage12_layout(groups, world, rank)
        terms["params"] = {"flat_param_groups": FP32 * sum(padded)}
        terms["optim_states"] = {"fp32_master": FP32 * sum(partition), "adam_moments": 2 * FP32 * sum(partition),
                                 "adam_step": FP32 * len(groups)}
        terms["comm_buffers"] = {"reduce_bucket": FP32 * bucket * (2 if overlap_comm else 1)}
    else:
        partition = sum(math.ceil(p.numel / world) for p in params)
        persistent = sum(p.numel for p in params if p.numel <= persistence_threshold) if world > 1 else 0
        terms["params"] = {"param_partitions": FP32 * partition, "persistent_params": FP32 * persistent}
        terms["optim_states"] = {"fp32_master": FP32 * partition, "adam_moments": 2 * FP32 * partition,
                                 "adam_step": FP32 * len(groups)}
        terms["comm_buffers"] = {"reduce_bucket": FP32 * bucket}
    points = gradient_points(stage, world, rank, groups, reduce_order, bucket)
    peak = max(points, key=lambda point: point.total)
    terms["grads"] = {k: v for k, v in peak.terms.items() if v}
    return {"bytes": {cls: sum(t.values()) for cls, t in terms.items()}, "terms": terms,
            "grad_peak_at": peak.label, "grad_points": len(points)}


def paper_bytes(stage: int, psi: int, world: int, master: bool) -> dict[str, float]:
    """The ZeRO paper's per-rank bytes in fp32: params, grads, optimizer states (K=12 with master, else 8)."""
    k = 12 if master else 8
    return {
        "params": 4 * psi / (world if stage >= 3 else 1),
        "grads": 4 * psi / (world if stage >= 2 else 1),
        "optim_states": k * psi / (world if stage >= 1 else 1),
    }
