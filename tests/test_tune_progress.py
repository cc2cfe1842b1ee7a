"""The sweep's console (tune/progress.py, training/console.py): raylm's line per trial event, Ray's and Tune's
chatter in the sweep's driver.log, warnings and errors still on the console; on a real Tune run of a plain
function trainable (no Train workers: the callback and Ray's log forwarding see the same either way)."""

import logging
import sys
import time

from tune.progress import SweepProgress, sweep_console

CHATTER = "chatter: loading 3 shards"  # an INFO-like line a trial prints: driver.log only


def console_is_this_tests(monkeypatch) -> None:
    """Ray's console handler writes to the stderr of the moment Ray was imported (pytest's session capture);
    point it at this test's, which capfd reads."""
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray").handlers:
        if isinstance(handler, PlainRayHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)


def run_sweep(tmp_path, name: str):
    from ray import tune

    def trainable(config):  # nested: pickled by value, workers need not import this test module
        import warnings

        from ray import tune

        print(CHATTER, flush=True)
        print("[raylm] a line of raylm's own from a trial", flush=True)
        warnings.warn("the learning rate looks high")  # stderr: '... UserWarning: the learning rate looks high'
        for step in (2, 4):
            tune.report({"step": step, "val_loss": config["optim.lr"] * step})

    tuner = tune.Tuner(
        trainable,
        param_space={"optim.lr": tune.grid_search([0.1, 0.2])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  callbacks=[SweepProgress("val_loss", ["optim.lr"], 4)]),
    )
    sweep_dir = tmp_path / name
    with sweep_console(sweep_dir) as driver_log:
        logging.getLogger("ray.tune.raylm_test").info("an INFO line of Ray's on the driver")
        logging.getLogger("ray.tune.raylm_test").warning("a WARNING of Ray's on the driver")
        grid = tuner.fit()
        # Forwarded worker lines arrive through Ray's log monitor, after the trial printed them: wait for them
        # here, inside the console's context (it decides what a line arriving later shows).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and driver_log.read_text().count(CHATTER) < 2:
            time.sleep(0.2)
    assert not grid.errors
    return grid, driver_log


def test_sweep_progress_prints_a_line_per_trial_event_and_keeps_rays_chatter_in_the_sweeps_driver_log(
        local_ray, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("RAYLM_CONSOLE", raising=False)
    console_is_this_tests(monkeypatch)
    grid, driver_log = run_sweep(tmp_path, "progress")
    out, err = capfd.readouterr()
    console = out + err
    # Tune prints nothing of its own: no configuration box, no status table, no TensorBoard hint.
    assert "Trial status" not in console and "Configuration for experiment" not in console
    assert "tensorboard" not in console.lower()
    lines = [line for line in out.splitlines() if line.startswith("[raylm-tune]")]
    ids = sorted(r.path.rsplit("/", 1)[-1] for r in grid)
    assert len(ids) == 2
    started = [line for line in lines if " started " in line]
    assert [line.split(": ", 1)[1] for line in started] == ["optim.lr=0.1", "optim.lr=0.2"]
    evaluations = [line for line in lines if "/4: val_loss" in line]
    assert len(evaluations) == 4 and any("step 4/4: val_loss 0.8" in line for line in evaluations), lines
    ends = [line for line in lines if "finished at step 4" in line]
    assert [line.rsplit("(", 1)[1] for line in ends] == ["1 ended so far)", "2 ended so far)"], lines
    # One line says where the logs are; they are there, with what the console left out.
    (where,) = [line for line in lines if "Ray's logs:" in line]
    assert str(driver_log) in where and str(tmp_path / "progress" / "ray_logs") in where
    assert (tmp_path / "progress" / "ray_logs").is_symlink() and (tmp_path / "progress" / "ray_logs").is_dir()
    assert len(lines) == 1 + 2 + 4 + 2, lines
    # The trials' chatter and Ray's INFO line are in driver.log only; raylm's lines and warnings are shown too.
    log = driver_log.read_text()
    assert log.count(CHATTER) == 2 and "an INFO line of Ray's on the driver" in log
    assert CHATTER not in console and "an INFO line of Ray's" not in console
    assert "a line of raylm's own from a trial" in console and "UserWarning: the learning rate looks high" in console
    assert "a WARNING of Ray's on the driver" in console and "a WARNING of Ray's on the driver" in log


def test_raylm_console_full_shows_the_chatter_and_tunes_own_output_again(local_ray, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RAYLM_CONSOLE", "full")
    console_is_this_tests(monkeypatch)
    _, driver_log = run_sweep(tmp_path, "full")
    out, err = capfd.readouterr()
    console = out + err
    assert CHATTER in console and "an INFO line of Ray's on the driver" in console
    assert "Configuration for experiment" in console  # Tune's own output engine, as Ray prints it
    assert driver_log.read_text().count(CHATTER) == 2  # the file is written either way
