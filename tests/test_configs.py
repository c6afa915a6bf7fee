"""Every YAML in configs/ loads, states what it reproduces, and its debug variant trains end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sparse_maml.cli import train
from sparse_maml.config import flatten, load_config, to_dict
from sparse_maml.results import method_of

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NOT_RUN_CONFIGS = {"paper_results.yaml"}  # data, not a run config
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_RUN_CONFIGS)
TABLE_CONFIGS = [p for p in RUN_CONFIGS if p.stem != "demo"]
PAPER_FILE = yaml.safe_load((CONFIGS / "paper_results.yaml").read_text())
PAPER = PAPER_FILE["accuracy"]
# File-name tag of a source protocol -> its run.protocol label.
PROTOCOL_TAGS = {"finn": "finn2017", "raghu": "raghu2020", "boil": "boil2021"}


pytestmark = pytest.mark.usefixtures("one_thread")


def debug_overrides() -> list[str]:
    """configs/debug.overrides, the mechanism behind run_sparse_MAML.sh --debug."""
    lines = (CONFIGS / "debug.overrides").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def cell_of(stem: str) -> tuple[str, str, int, str]:
    """(method, arch, shots, protocol) from a file name such as sparse_relu_maml_resnet12_1shot
    (the reference's protocol) or maml_conv4_5shot_finn_protocol (Finn et al.'s)."""
    match = re.fullmatch(r"(.+)_(conv4|resnet12)_(\d)shot(?:_([a-z]+)_protocol)?", stem)
    assert match, f"{stem}: table configs are named <method>_<arch>_<K>shot[_<source>_protocol]"
    return match[1], match[2], int(match[3]), PROTOCOL_TAGS[match[4]] if match[4] else "reference"


def method_from_config(cfg) -> str:
    """The method as utils/collect_results.py derives it from inner.* (the table's rule)."""
    return method_of(flatten(to_dict(cfg)))


def test_the_table_is_complete():
    """Every method and cell under the reference's protocol, plus one config per published baseline
    number under the protocol that produced it."""
    stems = {p.stem for p in TABLE_CONFIGS}
    expected = {f"{m}_{a}_{k}shot" for m in ("maml", "anil", "boil", "sparse_maml", "sparse_relu_maml")
                for a in ("conv4", "resnet12") for k in (1, 5)}
    expected |= {"sparse_maml_plus_conv4_1shot", "sparse_maml_plus_conv4_5shot", "meta_sgd_conv4_5shot"}
    tags = {v: k for k, v in PROTOCOL_TAGS.items()}
    for method, archs in PAPER.items():
        for arch, shots in archs.items():
            for k, entry in shots.items():
                if entry is not None and entry["protocol"] != "reference":
                    expected.add(f"{method}_{arch}_{k}shot_{tags[entry['protocol']]}_protocol")
    assert stems == expected
    assert len(expected) == 23 + 11


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    load_config(path)


def test_demo_config_states_the_defaults():
    """configs/demo.yaml must follow sparse_maml/config.py when a default changes."""
    demo, defaults = to_dict(load_config(CONFIGS / "demo.yaml")), to_dict(load_config(None))
    stale = [f"{section}.{key}: {value!r} in demo.yaml, default {defaults[section][key]!r}"
             for section, values in demo.items() for key, value in values.items()
             if value != defaults[section][key]]
    assert not stale, "update configs/demo.yaml: " + "; ".join(stale)


@pytest.mark.parametrize("path", TABLE_CONFIGS, ids=lambda p: p.stem)
def test_config_is_the_cell_it_names(path):
    """File name, run.name, run.protocol, inner.* method, arch, shots and the header's published
    number agree; the number is stated only where the config runs the protocol that produced it."""
    cfg = load_config(path)
    method, arch, shots, protocol = cell_of(path.stem)
    assert cfg.run.name == path.stem
    assert cfg.run.protocol == protocol and protocol in PAPER_FILE["protocols"]
    assert method_from_config(cfg) == method
    assert (cfg.model.arch, cfg.data.num_shots, cfg.data.num_ways) == (arch, shots, 5)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.num_query) == ("miniimagenet", 0, 15)
    if arch == "resnet12":
        assert cfg.model.widths == (64, 128, 256, 512)  # the reference's --resnet network
    else:  # 64 filters; 32 under Finn et al.'s protocol (and ANIL's, which reuses it)
        assert cfg.model.widths == ((32,) * 4 if protocol in ("finn2017", "raghu2020") else (64,) * 4)
    header = path.read_text().split("\nrun:")[0]
    stated = re.search(r"# Published number: (\d+\.\d+)", header)
    entry = PAPER.get(method, {}).get(arch, {}).get(shots)
    if entry is not None and entry["protocol"] == protocol:
        assert stated and float(stated[1]) == entry["value"]
    else:
        assert stated is None and "# Published number: none" in header
    if protocol == "reference":
        assert "Hyper-parameters" in header
    else:  # a source protocol: checked line by line, and what could not be matched is said
        assert "Line by line" in header and "Could not be matched" in header
        assert "# Source:" in header or "not in the" in header


def test_reference_hyper_parameters():
    """The values of the reference's launch script."""
    conv4 = {k: load_config(CONFIGS / f"sparse_maml_conv4_{k}shot.yaml") for k in (1, 5)}
    assert conv4[5].inner.step_size == 0.25 and conv4[1].inner.step_size == 0.1
    for cfg in conv4.values():
        assert (cfg.inner.steps, cfg.inner.eval_steps, cfg.inner.mask_init) == (35, 35, "kaiming")
        assert (cfg.train.epochs, cfg.train.batches_per_epoch, cfg.outer.meta_batch_size) == (400, 100, 2)
        assert (cfg.outer.mask_lr, cfg.outer.optimizer, cfg.train.val_from_epoch) == (0.0075, "adam", 100)
    for k in (1, 5):
        plus = load_config(CONFIGS / f"sparse_maml_plus_conv4_{k}shot.yaml")
        assert plus.inner.mask_generator and plus.inner.step_size == 0.1
        assert (plus.train.epochs, plus.outer.optimizer, plus.outer.mask_optimizer) == (600, "sgd", "sgd")
    for path in CONFIGS.glob("*_resnet12_*shot.yaml"):  # the reference's protocol only
        cfg = load_config(path)
        assert (cfg.train.epochs, cfg.train.batches_per_epoch, cfg.outer.meta_batch_size) == (40, 1000, 1)
        assert (cfg.inner.steps, cfg.inner.adapt_batchnorm, cfg.outer.grad_clamp) == (35, False, 10)
        assert cfg.train.val_from_epoch == 10
        expected_alpha = 0.01 if path.stem == "sparse_relu_maml_resnet12_1shot" else 0.05
        assert cfg.inner.step_size == expected_alpha, path.stem
        if cfg.inner.mask != "none":
            assert cfg.outer.mask_lr == 0.01
        if cfg.inner.mask == "relu_ste":
            assert cfg.inner.mask_init == "constant"


SOURCE_CONFIGS = sorted(CONFIGS.glob("*_protocol.yaml"))
# A value's comment names a line of a source file (main.py:249, run_resnet.sh@d7c492e2:60-61), the
# notebook BOIL's numbers come from, or says that it is an assumption or no setting of the source.
SOURCE_CITATION = re.compile(r"[\w/]+\.(py|sh|md)(@\w+)?:\d+|analysis\.ipynb|assumption|not a source setting")


@pytest.mark.parametrize("path", SOURCE_CONFIGS, ids=lambda p: p.stem)
def test_every_source_protocol_value_names_its_source(path):
    """Each `key: value` line of a *_protocol.yaml carries a comment citing where the value comes
    from, and every field the file sets is on such a line."""
    body = path.read_text().split("\nrun:", 1)[1]
    values = [line for line in ("run:" + body).splitlines()
              if line.startswith("  ") and not line.lstrip().startswith("#")]
    assert values
    for line in values:
        assert SOURCE_CITATION.search(line.partition("#")[2]), f"{path.name}: {line.strip()}"
    assert len(values) == sum(len(section) for section in yaml.safe_load(path.read_text()).values())


def test_source_protocol_schedules_test_episodes_and_optimizer_resets():
    """BOIL's rows re-create Adam every 100 meta-batches, test 5 x 1000 tasks, and its ResNet-12 rows
    stop at the 10,000-meta-batch checkpoint its notebook tests (Conv4: 30,000); Finn's and Raghu's
    rows test with K query images per class and never reset the optimizer."""
    for path in SOURCE_CONFIGS:
        cfg = load_config(path)
        total = cfg.train.epochs * cfg.train.batches_per_epoch
        if cfg.run.protocol == "boil2021":
            assert cfg.outer.reset_optimizer_every == 100, path.stem
            assert total == (10_000 if cfg.model.arch == "resnet12" else 30_000), path.stem
            assert (cfg.train.num_test_tasks, cfg.data.test_query) == (5000, 15), path.stem
        else:
            assert cfg.outer.reset_optimizer_every == 0 and total == 60_000, path.stem
            assert cfg.data.num_test_query == cfg.data.num_shots, path.stem
            assert cfg.data.num_query == 15 and cfg.train.num_test_tasks == 600, path.stem
        assert cfg.train.val_from_epoch > cfg.train.epochs, path.stem  # the final weights are tested


# Table 1 of von Oswald et al. 2021 (MiniImageNet 5-way, %): (shots, arch) -> MAML, ANIL, BOIL,
# sparse-MAML, sparse-ReLU-MAML; None where the paper has no number.
PAPER_TABLE = {
    (5, "conv4"): (63.15, 61.50, 66.45, 67.03, 66.80),
    (1, "conv4"): (48.07, 46.70, 49.61, 50.35, 50.15),
    (5, "resnet12"): (69.36, 70.03, 70.50, 70.02, 73.01),
    (1, "resnet12"): (53.91, 55.25, None, 55.02, 56.39),
}


def test_paper_results_file_matches_the_paper_table():
    """configs/paper_results.yaml holds every number of the paper's Table 1, each with its source and
    protocol; the two README versions of the Conv4 sparse-ReLU-MAML numbers are both kept."""
    methods = ["maml", "anil", "boil", "sparse_maml", "sparse_relu_maml"]
    for (shots, arch), values in PAPER_TABLE.items():
        for method, value in zip(methods, values):
            entry = PAPER[method][arch][shots]
            assert (entry and entry["value"]) == value, (method, arch, shots)
            if entry:
                assert entry["source"] and entry["protocol"] in PAPER_FILE["protocols"]
                assert (entry["protocol"] == "reference") == method.startswith("sparse")
    relu = PAPER["sparse_relu_maml"]["conv4"]
    assert (relu[5]["earlier"]["value"], relu[1]["earlier"]["value"]) == (64.84, 50.39)
    boil = PAPER["boil"]["conv4"]  # BOIL's README re-run beside the paper's numbers
    assert (boil[1]["rerun"]["value"], boil[5]["rerun"]["value"]) == (49.65, 65.32)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_debug_variant_trains_end_to_end(path, tmp_path):
    """The config plus configs/debug.overrides trains, validates and tests on synthetic data."""
    overrides = debug_overrides() + [f"run.dir={tmp_path / 'run'}"]
    cfg = load_config(path, overrides)
    assert cfg.data.name == "synthetic"
    full = load_config(path)
    # The debug variant keeps the method, the architecture and the shot count of the config.
    assert (cfg.inner.mask, cfg.inner.adapt, cfg.inner.mask_generator, cfg.model.arch,
            cfg.data.num_shots) == (full.inner.mask, full.inner.adapt, full.inner.mask_generator,
                                    full.model.arch, full.data.num_shots)
    run_dir = train.main(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert {"train", "val", "test"} <= set(kinds)
    test = next(r for r in records if r["kind"] == "test")
    assert 0.0 <= test["accuracy"] <= 1.0 and test["num_tasks"] == 2
    assert (run_dir / "best.pt").is_file()
    train_record = next(r for r in records if r["kind"] == "train")
    assert ("layer_sparsity" in train_record) == (cfg.inner.mask != "none")
