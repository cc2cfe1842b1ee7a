"""The sweep's console (tune/progress.py): raylm's line per trial event, on a real Tune run of a plain
function trainable (no Train workers: the callback sees what Tune hands it either way)."""

from tune.progress import SweepProgress


def test_sweep_progress_prints_a_line_per_trial_event_with_tune_silent(local_ray, tmp_path, capsys):
    from ray import tune

    def trainable(config):  # nested: pickled by value, workers need not import this test module
        for step in (2, 4):
            tune.report({"step": step, "val_loss": config["optim.lr"] * step})

    tuner = tune.Tuner(
        trainable,
        param_space={"optim.lr": tune.grid_search([0.1, 0.2])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=1),
        run_config=tune.RunConfig(name="progress", storage_path=str(tmp_path), verbose=0,
                                  callbacks=[SweepProgress("val_loss", ["optim.lr"], 4)]),
    )
    grid = tuner.fit()
    assert not grid.errors
    out = capsys.readouterr().out
    # Tune at verbose=0 still prints its configuration box once and a final status table, but no status
    # table every 30 s in between.
    assert out.count("Trial status") <= 1 and out.count("Configuration for experiment") == 1
    lines = [line for line in out.splitlines() if line.startswith("[raylm-tune]")]
    ids = sorted(r.path.rsplit("/", 1)[-1] for r in grid)
    assert len(ids) == 2
    started = [line for line in lines if " started " in line]
    assert [line.split(": ", 1)[1] for line in started] == ["optim.lr=0.1", "optim.lr=0.2"]
    evaluations = [line for line in lines if "/4: val_loss" in line]
    assert len(evaluations) == 4 and any("step 4/4: val_loss 0.8" in line for line in evaluations), lines
    ends = [line for line in lines if "finished at step 4" in line]
    assert [line.rsplit("(", 1)[1] for line in ends] == ["1 ended so far)", "2 ended so far)"], lines
    assert len(lines) == 2 + 4 + 2, lines
