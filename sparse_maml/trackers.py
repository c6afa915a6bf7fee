"""Optional experiment trackers that mirror the run log: Weights & Biases (run.wandb_project) and
MLflow (run.mlflow_uri). Neither is required: each is imported only when its field is set, and a
missing package is a ConfigError that names the extra to install. A resumed run continues the same
tracker run (its id is derived from the run folder), so one run folder is one tracker run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, flatten, to_dict


def _missing(field: str, value: str, package: str) -> ConfigError:
    return ConfigError(f"run.{field}={value}: the {package} package is not installed; install the "
                       f"extra (pip install -e '.[{package}]' in this folder, or pip install "
                       f"{package}) or leave run.{field} empty")


def run_id(run_dir: Path) -> str:
    """A stable id for the run folder (the same on every resume)."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def flat_params(config: Config) -> dict[str, Any]:
    """The config as flat `section.key` -> value, lists as text (what trackers accept)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in flatten(to_dict(config)).items()}


class WandbTracker:
    """A W&B run named after the run folder, in the project run.wandb_project."""

    def __init__(self, config: Config, run_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb_project", config.run.wandb_project, "wandb") from err
        try:
            self.run = wandb.init(project=config.run.wandb_project, name=Path(run_dir).name,
                                  id=run_id(run_dir), resume="allow", config=flat_params(config))
        except Exception as err:  # wandb's own errors (login, network) are not exceptions we know
            raise ConfigError(f"run.wandb_project={config.run.wandb_project}: W&B refused the run: "
                              f"{type(err).__name__}: {err}") from err

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, float]) -> None:
        self.run.summary.update(summary)
        self.run.finish()

    def close(self) -> None:
        """Training stopped before finish(): end this process's part; a resume continues it."""
        self.run.finish(exit_code=3)


class MlflowTracker:
    """An MLflow run in the experiment run.name at run.mlflow_uri, tagged with the run folder: a
    resume finds it by the tag and continues it."""

    def __init__(self, config: Config, run_dir: Path):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow_uri", config.run.mlflow_uri, "mlflow") from err
        try:
            self.client = client = MlflowClient(tracking_uri=config.run.mlflow_uri)
            experiment = client.get_experiment_by_name(config.run.name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(config.run.name))
            key = run_id(run_dir)
            found = client.search_runs([experiment_id], f"tags.run_folder_id = '{key}'")
            if found:
                self.run_id = found[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {"run_folder_id": key, "run_folder": str(Path(run_dir).resolve())}
                self.run_id = client.create_run(experiment_id, run_name=Path(run_dir).name,
                                                tags=tags).info.run_id
                params = [Param(k, str(v)[:500]) for k, v in flat_params(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    client.log_batch(self.run_id, params=params[i:i + 100])
        except Exception as err:  # MlflowException (a store it refuses), connection errors
            raise ConfigError(f"run.mlflow_uri={config.run.mlflow_uri}: MLflow refused the run: "
                              f"{type(err).__name__}: {str(err).splitlines()[0]}") from err

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, float]) -> None:
        if summary:
            self.log(0, {f"final/{k}": v for k, v in summary.items()})
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        """Training stopped before finish(): KILLED until a resume continues the run."""
        self.client.set_terminated(self.run_id, status="KILLED")


def open_trackers(config: Config, run_dir: Path) -> list[Any]:
    """The trackers the config turns on (none by default)."""
    turned_on = [(config.run.wandb_project, WandbTracker), (config.run.mlflow_uri, MlflowTracker)]
    return [tracker(config, run_dir) for field, tracker in turned_on if field]
