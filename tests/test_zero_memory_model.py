"""The replay of DeepSpeed's ZeRO allocations (benchmarks.zero_memory_model): pure functions, no torch.

The benchmark (benchmarks.zero_memory, tests/test_benchmarks_training.py) checks it against real
DeepSpeed engines; these cases pin the rules it encodes on small hand-checkable layouts.
"""

from benchmarks.zero_memory_model import Param, expected_bytes, gradient_points, stage12_layout

# A tied-embedding Llama in miniature: DeepSpeed's group order (embedding first), one no-decay group.
GROUPS = [[Param(0, 1000), Param(1, 300), Param(2, 300), Param(3, 300)], [Param(4, 8, 1), Param(5, 8, 1)]]
PSI = 1916
BACKWARD = [5, 3, 2, 4, 1, 0]  # hook order: last layers first, the tied embedding's gradient last


def test_a_param_straddling_the_partition_boundary_is_counted_whole_on_both_ranks():
    padded, partition, rank0 = stage12_layout(GROUPS, world=2, rank=0)
    _, _, rank1 = stage12_layout(GROUPS, world=2, rank=1)
    assert padded == [1900, 16] and partition == [950, 8]
    assert rank0 == {0, 4} and rank1 == {0, 1, 2, 3, 5}  # the embedding spans [0, 1000): both ranks


def test_stage2_peak_is_the_partition_buffer_plus_the_last_gradient_when_it_bypasses_the_bucket():
    rank1 = expected_bytes(2, 2, 1, GROUPS, BACKWARD, bucket=500)
    partition_buffer = 4 * (1000 + 900 + 8)
    # from the moment the embedding's gradient arrives (in hand, then bypassing) until the epilogue
    assert rank1["bytes"]["grads"] == partition_buffer + 4 * 1000
    assert rank1["terms"]["grads"]["grad_partition_buffer"] == partition_buffer
    assert rank1["bytes"]["comm_buffers"] == 4 * 500


def test_a_bucket_larger_than_the_model_holds_every_gradient_in_the_comm_buffer():
    points = gradient_points(2, 2, 0, GROUPS, BACKWARD, bucket=10_000)
    assert [p.label for p in points] == ["end of backward", "before reduction 1", "after reduction 1"]
    assert [p.total for p in points] == [0, 0, 4 * (1000 + 8)]  # then only rank 0's partition buffer


def test_stage1_allocates_its_partition_buffer_while_every_full_gradient_is_alive():
    # reduce_gradients walks the groups in order after backward: the embedding bypasses a 500 bucket,
    # and the reduction the next gradient triggers copies it into rank 0's freshly allocated buffer.
    stage1 = expected_bytes(1, 2, 0, GROUPS, [0, 1, 2, 3, 4, 5], bucket=500)
    assert stage1["bytes"]["grads"] == 4 * (PSI - 1000) + 4 * (1000 + 8)
    assert stage1["grad_peak_at"] == "after reduction 2"
    assert expected_bytes(1, 2, 0, GROUPS, [0, 1, 2, 3, 4, 5], bucket=10_000)["bytes"]["grads"] == 4 * PSI


def test_stage3_holds_ceil_partitions_and_keeps_small_params_whole():
    stage3 = expected_bytes(3, 2, 0, GROUPS, BACKWARD, bucket=500, persistence_threshold=10)
    assert stage3["terms"]["params"] == {"param_partitions": 4 * 958, "persistent_params": 4 * 16}
    assert stage3["bytes"]["grads"] == 4 * 958 + 4 * 1000
    assert stage3["terms"]["optim_states"] == {"fp32_master": 4 * 958, "adam_moments": 8 * 958, "adam_step": 8}
    # one rank: the gathered data of a persistent param is a view of its (whole) partition
    single = expected_bytes(3, 1, 0, GROUPS, BACKWARD, bucket=500, persistence_threshold=10)
    assert single["terms"]["params"] == {"param_partitions": 4 * PSI, "persistent_params": 0}
