"""Resume on another worker count: 2 -> 1 and 1 -> 2 workers under ZeRO 1, 2 and 3 (real Ray, real DeepSpeed).

Per stage (benchmarks.elastic_resume.resize_cases): a clean 2-worker run; its step-2 checkpoint
continued on 1 worker (2 -> 1 through the universal copy, accumulation 2 keeping the global batch of
8 blocks) must match it at steps 3-4; that run's step-4 checkpoint, written by 1 worker, continued
on 2 workers (1 -> 2) must match the 1-worker run at steps 5-6; within 1e-3.
"""

import pytest

from benchmarks.elastic_resume import GROW_STEP, RESUME_STEP, resize_cases, write_corpus
from training.checkpoints import checkpoint_dir_name, list_checkpoints, manifest_problem

pytestmark = pytest.mark.slow

TOL = 1e-3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_corpus(root)
    return root


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_another_worker_count_continues_the_loss_curve(local_ray, workdir, stage, capfd):
    result = resize_cases(workdir, stage, steps=6)
    console = "".join(capfd.readouterr())
    shrink, grow = result["cases"]["2->1"], result["cases"]["1->2"]
    print(f"ZeRO-{stage} |loss - never-resized|: 2->1 {shrink['loss_dev']}, 1->2 {grow['loss_dev']}; "
          f"conversion s: {shrink['conversion_s']}, {grow['conversion_s']}")
    assert (shrink["world_size"], shrink["resumed_from_world_size"]) == ([1, 1], 2), "world_size per step"
    assert (grow["world_size"], grow["resumed_from_world_size"]) == ([2, 2], 1)
    assert max(shrink["loss_dev"] + grow["loss_dev"]) <= TOL, result
    assert shrink["conversion_s"] is not None and grow["conversion_s"] is not None

    for run, step in ((f"shrunk{stage}", RESUME_STEP), (f"grown{stage}", GROW_STEP)):
        # the converted copy is complete and kept beside its checkpoint; every checkpoint verifies
        assert manifest_problem(workdir / run / checkpoint_dir_name(step) / "universal") is None
        assert all(manifest_problem(c) is None for c in list_checkpoints(workdir / run))

    # The console carries raylm's lines, not Ray Train's per-rank report lines (those stay in Ray's logs).
    assert "[raylm] step 6/6" in console and "1 worker |" in console
    assert "Reporting training result" not in console
    assert (workdir / f"grown{stage}" / "ray_logs").is_symlink()
