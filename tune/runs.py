"""The kind of run a sweep tunes (pretrain or finetune): how its data is prepared, streamed and trained.

Each kind's own functions do the work (training.data / training.pretrain for pretraining,
training.finetune_prep / training.finetune for fine-tuning); this module only picks them, so a trial
is built exactly as `python -m training.pretrain` / `python -m training.finetune` builds its run.
"""

from __future__ import annotations

from dataclasses import asdict


def prepare_data(base) -> tuple[dict, dict]:
    """Prepare the base run's data once, on the driver: (paths and facts every trial reads, stats).

    Raises what the kind's preparation raises on bad input (see `data_error_message`).
    """
    if base.kind == "finetune":
        from training.finetune_prep import prepare_finetune_data

        prepared = prepare_finetune_data(base)
    else:
        from training.data import prepare_data as prepare_pretrain_data

        prepared = prepare_pretrain_data(base)
    return {k: v for k, v in asdict(prepared).items() if k != "stats"}, prepared.stats


def data_errors(kind: str) -> tuple[type[BaseException], ...]:
    """The exceptions data preparation raises for bad input (a clear one-line error, no traceback)."""
    if kind == "finetune":
        from training.finetune_data import DataError

        return OSError, ValueError, DataError
    return OSError, ValueError


def data_error_message(err: BaseException) -> str:
    from training.driver import data_error_message as message

    return message(err)


def build_datasets(kind: str, prepared: dict) -> dict:
    """The Ray Data streams of the prepared data, built once on the driver and shared by every trial."""
    if kind == "finetune":
        from training.finetune import build_datasets as finetune_datasets

        return finetune_datasets(prepared)
    from training.pretrain import build_datasets as pretrain_datasets

    return pretrain_datasets(prepared)


def build_trainer(cfg, prepared: dict, *, callbacks, datasets: dict, init_checkpoint: str | None):
    """The trial's TorchTrainer, built by the kind's own builder (the one its training command uses)."""
    if cfg.kind == "finetune":
        from training.finetune import build_trainer as finetune_trainer

        return finetune_trainer(cfg, prepared, callbacks=callbacks, datasets=datasets, init_checkpoint=init_checkpoint)
    from training.pretrain import build_trainer as pretrain_trainer

    return pretrain_trainer(cfg, prepared, callbacks=callbacks, datasets=datasets, init_checkpoint=init_checkpoint)
