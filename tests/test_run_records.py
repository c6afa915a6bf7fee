"""What a run records beside its metrics: provenance.jsonl, TensorBoard's config text, mask
histograms and hparams, and the optional trackers (W&B offline, MLflow's local file store)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sparse_maml.cli import train
from sparse_maml.config import ConfigError
from sparse_maml.run_folder import written_files
from sparse_maml.trackers import run_id

from helpers import tiny_config

ONE_EPOCH = ["train.epochs=1", "train.batches_per_epoch=1", "train.num_val_tasks=2",
             "train.num_test_tasks=2", "train.eval_batch_size=2"]


def test_provenance_is_appended_per_start_and_tensorboard_holds_config_masks_hparams(
        tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train.main(tiny_config(*ONE_EPOCH, f"run.dir={run_dir}", "run.tensorboard=true"))
    train.main(tiny_config(*ONE_EPOCH, "train.epochs=2", f"run.dir={run_dir}",
                           "run.tensorboard=true", "run.resume=auto"), run_dir)

    records = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "resume"]
    for record in records:
        assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
        assert record["command"][0] == sys.executable and record["device"] == "cpu"
        assert record["host"] and record["time"].endswith("Z")
        assert record["git"] is None or set(record["git"]) == {"commit", "dirty"}
    assert "provenance.jsonl" in written_files(run_dir)  # so run.overwrite=true removes it

    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    inner:\n" in text and "      mask: binary_ste" in text
    histograms = [t for t in events.Tags()["histograms"] if t.startswith("mask/")]
    assert "mask/head.weight" in histograms and "mask/body.block1.conv.weight" in histograms
    # one histogram per epoch; a binary mask's values are 0 and 1 only
    head = events.Histograms("mask/head.weight")
    assert [h.step for h in head] == [1, 2]
    assert head[-1].histogram_value.min >= 0 and head[-1].histogram_value.max <= 1
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(
        events.PluginTagToContent("hparams"))
    final = events.Scalars("hparam/test_accuracy")[-1].value
    test = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "test"][-1]
    assert final == pytest.approx(test["accuracy"])


def test_wandb_offline_receives_the_config_and_the_metrics(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    train.main(tiny_config(*ONE_EPOCH, f"run.dir={run_dir}", "run.wandb_project=sparse-maml-test"))
    # One offline run, its id derived from the run folder (a resume continues it), whose record
    # file (protobuf, written for a later `wandb sync`) holds the config and the metrics.
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id(run_dir)}"))
    assert len(offline) == 1
    data = (offline[0] / f"run-{run_id(run_dir)}.wandb").read_bytes()
    for name in (b"inner.mask", b"binary_ste", b"train_step/loss", b"val/accuracy",
                 b"test/accuracy", b"test_accuracy"):
        assert name in data, name


def test_mlflow_local_store_receives_params_metrics_and_the_end(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, no server
    uri = f"file:{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "run"
    train.main(tiny_config(*ONE_EPOCH, f"run.dir={run_dir}", f"run.mlflow_uri={uri}",
                           "run.name=tracked"))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["inner.mask"] == "binary_ste"
    assert {"train/loss", "val/accuracy", "test/accuracy", "final/test_accuracy"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "train_step/loss")
    assert [m.step for m in history] == [1]


def test_a_tracker_that_is_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"run.wandb_project=p: the wandb package is not "
                                          r"installed; install the extra \(pip install -e '.\[wandb\]'"):
        train.main(tiny_config(*ONE_EPOCH, f"run.dir={tmp_path / 'run'}", "run.wandb_project=p"))
