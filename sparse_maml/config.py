"""Typed, frozen experiment configuration.

One dataclass per section; the defaults are the built-in demo (sparse-MAML on the synthetic glyph
data, about two minutes on a laptop CPU). Precedence: command-line overrides > YAML file > defaults.
An unknown key, a value of the wrong type or an invalid choice raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

# The backbones models.MODELS builds (named here so that reading a config imports no torch; the
# registry test checks the two agree).
BUILTIN_ARCHS = ("conv4", "resnet12")

# Field roles: what changing a field means. A field without one changes the experiment: a resume
# refuses the change, and the results tools keep runs that differ in it apart.
SCHEDULE = "schedule"  # how long and when to train and evaluate: may change on resume
HOUSEKEEPING = "housekeeping"  # where and how the run executes: may change, results unchanged
REPLICATE = "replicate"  # which repetition of the experiment (seed, label): fixed on resume,
# pooled as seeds of one cell by the results tools


def _role(role: str) -> Any:
    return lambda default: field(default=default, metadata={"role": role})


# schedule(default), housekeeping(default), replicate(default): a field with that role, e.g.
# train.epochs, data.root, run.seed.
schedule, housekeeping, replicate = _role(SCHEDULE), _role(HOUSEKEEPING), _role(REPLICATE)


@dataclass(frozen=True)
class RunConfig:
    name: str = housekeeping("sparse_maml_demo")
    """Run name; the run folder is `<out_dir>/<name>-<timestamp>` unless `dir` is given."""
    out_dir: str = housekeeping("runs")
    """Parent folder of run folders."""
    dir: str = housekeeping("")
    """Explicit run folder (empty: derived from out_dir, name and the start time)."""
    overwrite: bool = housekeeping(False)
    """Allow writing into a run folder that already holds a run."""
    seed: int = replicate(0)
    """Seeds Python, NumPy and torch, and the stream of training episodes."""
    device: str = housekeeping("auto")
    """auto | cpu | cuda | cuda:<index>."""
    deterministic: bool = housekeeping(False)
    """Ask torch for deterministic kernels (slower; makes CUDA runs repeatable)."""
    tensorboard: bool = housekeeping(True)
    """Write TensorBoard event files beside metrics.jsonl."""
    progress: bool = housekeeping(True)
    """Show tqdm progress bars."""
    resume: Literal["never", "auto"] = housekeeping("never")
    """auto: if run.dir already holds this run, continue from its newest loadable checkpoint
    (the config may differ only in keys that leave the run's state valid, e.g. train.epochs);
    never: refuse a run.dir that holds a run (see `train.py --resume RUN_DIR` and run.overwrite)."""
    keep_checkpoints: int = housekeeping(2)
    """Numbered checkpoints (checkpoint-<step>.pt) kept in the run folder, newest first; >= 1.
    best.pt is kept in addition."""
    checkpoint_every: int = housekeeping(0)
    """Also checkpoint every this many meta-batches (0: only at the end of each epoch, on a stop
    signal and when the NaN guard stops the run)."""
    wandb_project: str = housekeeping("")
    """Also log the run's numbers and config to Weights & Biases, in this project (empty: off).
    Needs the `wandb` extra (pip install '.[wandb]'); WANDB_MODE=offline logs without a network."""
    mlflow_uri: str = housekeeping("")
    """Also log the run's numbers and config to MLflow at this tracking URI, in the experiment
    named run.name, e.g. file:./mlruns or http://host:5000 (empty: off). Needs the `mlflow` extra."""
    protocol: str = replicate("")
    """Label of the published protocol this run follows, read by utils/collect_results.py: it puts
    a published number beside a run only when the number was produced under this protocol (see
    configs/paper_results.yaml: reference, finn2017, raghu2020, boil2021). Empty: none claimed."""


@dataclass(frozen=True)
class DataConfig:
    name: Literal["synthetic", "omniglot", "miniimagenet", "tieredimagenet", "cub", "cars",
                  "folder"] = "synthetic"
    """Few-shot dataset. `synthetic` is generated on the fly from a seed (nothing to download);
    `folder` is your own: root/{train,val,test}/<class>/<image files> (see data.image_size,
    data.grayscale, data.normalize)."""
    root: str = housekeeping("data")
    """Folder that holds the dataset (ignored for synthetic)."""
    layout: str = housekeeping("auto")
    """On-disk layout of the dataset; `auto` detects it from what is in root."""
    download: bool = housekeeping(False)
    """Fetch and prepare the dataset into root if it is missing."""
    image_size: int = 0
    """Side of the square input images; 0 means the dataset's usual size (84, or 28 for glyphs).
    data.name=folder needs it set: every image is resized (not cropped) to this side."""
    grayscale: bool = False
    """data.name=folder only: read images as one grey channel (else as RGB colour)."""
    normalize: Literal["auto", "imagenet", "train", "none"] = "auto"
    """Input normalisation: imagenet (mean/std of ImageNet, colour only), train (per-channel
    mean/std of the train split, computed once and recorded in data.root; data.name=folder only),
    none (pixels in [0, 1]), or auto: the dataset's usual (ImageNet for the colour datasets, none
    for glyphs and Omniglot, train for folder)."""
    num_ways: int = 5
    """Classes per task (N)."""
    num_shots: int = 1
    """Support images per class (K)."""
    num_query: int = 15
    """Query images per class of training and validation episodes."""
    num_test_query: int = schedule(0)
    """Query images per class of the episodes test.py and the end-of-training test score
    (0: data.num_query). Finn et al.'s MiniImageNet test draws K, the shot count (cbfinn/maml
    main.py:249), and validates with 15 as it trains; with batch-statistics BatchNorm the number
    changes the predictions, not only the interval."""
    augment: bool = False
    """Train-split augmentation: random crop with padding, colour jitter, horizontal flip."""
    omniglot_rotations: bool = False
    """Omniglot only: add the 90/180/270-degree rotations of each character as new classes."""
    num_workers: int = housekeeping(0)
    """DataLoader worker processes that build episodes."""
    synthetic_seed: int = 0
    """Seed that generates the synthetic glyph classes (fixed, so runs share the same data)."""
    on_device: bool = housekeeping(False)
    """Hold each split as one uint8 tensor on the run's device and build episodes there (same
    episodes as the default path; MiniImageNet train needs about 0.8 GB of device memory)."""

    @property
    def test_query(self) -> int:
        """Query images per class of test episodes: num_test_query, or num_query if it is 0."""
        return self.num_test_query or self.num_query


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "conv4"
    """Backbone: conv4 (4 conv blocks), resnet12 (4 residual blocks), or your own as
    `module:Class` or `path/to/file.py:Class`: an nn.Module built as Class(in_channels=,
    num_ways=, image_size=) with a `head` nn.Linear (see README, "Your own backbone")."""
    widths: tuple[int, ...] = (32, 32, 32, 32)
    """Channels of the four blocks of conv4 / resnet12 (a backbone of your own ignores them).
    Paper: conv4 64-64-64-64, resnet12 64-128-256-512 or 64-160-320-640."""


@dataclass(frozen=True)
class InnerConfig:
    adapt: Literal["all", "head", "body"] = "all"
    """Which parameters adapt in the inner loop: all (MAML), head (ANIL) or body (BOIL)."""
    adapt_batchnorm: bool = True
    """Whether BatchNorm scales and shifts adapt in the inner loop (ResNet runs: false)."""
    adapt_shortcut: bool = True
    """Whether the ResNet-12 1x1 shortcut branch adapts in the inner loop."""
    steps: int = 5
    """Inner gradient steps during meta-training (paper: 35)."""
    eval_steps: int = 10
    """Inner gradient steps at validation and test time (paper: 35)."""
    step_size: float = 0.25
    """Inner learning rate alpha (paper: 0.25 for 5-shot Conv4, 0.1 for 1-shot)."""
    first_order: bool = True
    """First-order meta-gradient (reference default); false back-propagates through inner gradients."""
    mask: Literal["none", "binary_ste", "relu_ste", "relu", "linear", "exp"] = "binary_ste"
    """Mask function f(phi): none (plain MAML), binary_ste (sparse-MAML), relu_ste (sparse-ReLU-MAML),
    relu, linear (Meta-SGD) or exp. The last four make the mask a per-weight learning rate."""
    mask_target: Literal["gradient", "weight"] = "gradient"
    """gradient: p <- p - alpha*(m*g); weight: start from theta*m and apply p <- (p - alpha*g)*m."""
    mask_generator: bool = False
    """sparse-MAML+: a generator draws a fresh mask per task for every adapted conv weight."""
    mask_init: Literal["uniform", "kaiming", "constant", "meta_sgd"] = "kaiming"
    """phi init: uniform(-1/2, 1/2) or Kaiming-uniform (both mean-centred, plus mask_init_shift),
    constant = step_size, or meta_sgd = uniform(0.005, 0.1)."""
    mask_init_shift: float = 0.0
    """Added to the centred uniform/Kaiming init (and to generator logits): sets initial sparsity."""


@dataclass(frozen=True)
class OuterConfig:
    meta_batch_size: int = 4
    """Tasks per outer update (paper: 2 for Conv4, 1 for ResNet-12)."""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """How query losses of a meta-batch combine; the reference sums them."""
    grad_clamp: Optional[float] = None
    """Clamp theta's outer gradients to [-c, c] (paper ResNet runs: 10); phi is never clamped."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer of theta (SGD uses momentum 0.9, Nesterov)."""
    lr: float = 1e-3
    """Outer learning rate of theta."""
    mask_optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer of phi (and of the sparse-MAML+ generator)."""
    mask_lr: float = 0.0075
    """Outer learning rate of phi."""
    momentum: float = 0.9
    """Momentum of the SGD optimizers (Nesterov when > 0)."""
    implementation: Literal["loop", "vmap", "compiled", "reference"] = housekeeping("loop")
    """How a meta-batch is adapted. loop: task after task, first-order runs in closed form (no
    inner graph); vmap: the same math with all tasks in one torch.func.vmap call; compiled
    (first-order only): the inner step and the query pass as torch.compile graphs, compiled once
    per run (the time is logged; kernels are cached across runs), tasks in parallel on worker
    threads on a multi-core CPU; reference: the plain step-by-step chain of the reference code,
    which the others are tested against."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = housekeeping("default")
    """torch.compile mode of outer.implementation=compiled; reduce-overhead replays each graph as
    a CUDA graph (CUDA only)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: run the inner and outer passes under bfloat16 autocast (faster on recent GPUs; not
    exact, so check accuracy against an fp32 run); weights, masks and optimizer stay fp32."""
    checkpoint_inner_steps: bool = housekeeping(False)
    """Second-order runs: recompute each inner step's activations in the outer backward pass
    instead of keeping them (memory of one step instead of `inner.steps`, about 1.5x the time)."""
    reset_optimizer_every: int = 0
    """Clear the state of the outer optimizers (Adam's moments and step count, SGD's momentum)
    before every this many meta-batches (0: never, the reference). BOIL builds a new Adam every
    100 meta-batches: its main() creates the optimizer (HJ-Yoo/BOIL main.py:44-49) and is called
    once per --train-batches=100 meta-batches (main.py:179, main.py:146)."""
    max_bad_steps: int = housekeeping(10)
    """Stop the run (after checkpointing the last good state) when this many consecutive meta-batches
    have a non-finite outer loss, gradient or update; each such update is skipped (or rolled back)
    and counted."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = schedule(10)
    """Training epochs (paper: 400 Conv4, 40 ResNet-12)."""
    batches_per_epoch: int = 30
    """Meta-batches per epoch (paper: 100 Conv4, 1000 ResNet-12)."""
    val_every: int = schedule(2)
    """Validate every this many epochs (and after the last one)."""
    val_from_epoch: int = schedule(0)
    """First epoch (1-based) that is validated and may become the best checkpoint (paper: 100 / 10)."""
    validate_early: bool = schedule(False)
    """Also validate every val_every epochs before val_from_epoch, for monitoring only: those
    validations never become the best checkpoint (the reference does not run them)."""
    num_val_tasks: int = 100
    """Fixed validation tasks."""
    num_test_tasks: int = schedule(600)
    """Fixed test tasks for the final evaluation."""
    eval_batch_size: int = housekeeping(10)
    """Tasks adapted together during evaluation."""
    test_after_training: bool = housekeeping(True)
    """Evaluate the best checkpoint on the test split at the end of train.py."""


@dataclass(frozen=True)
class CrossDomainConfig:
    """Roots of datasets on which train.py also tests the best checkpoint (empty: skipped)."""

    tieredimagenet: str = housekeeping("")
    """Root of tieredImageNet (test split, 160 classes)."""
    cub: str = housekeeping("")
    """Root of CUB-200-2011 (test split, 50 classes)."""
    cars: str = housekeeping("")
    """Root of Stanford Cars (test split, 49 classes)."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cross_domain: CrossDomainConfig = field(default_factory=CrossDomainConfig)


# Reading YAML. A config may come from someone else (a received run folder), so the reader is
# bounded and strict: no aliases (500 bytes of nested aliases expand to 10^8 strings), no nesting
# deeper than MAX_DEPTH, no file over MAX_BYTES, no key given twice, and
# YAML 1.2's numbers and booleans instead of YAML 1.1's surprises (`1:30` is 90, `010` is 8, `no`
# is false): those stay text, which the schema then refuses, naming the key.

MAX_BYTES = 1 << 20
MAX_DEPTH = 16
_SHOWN = 80  # characters of a value quoted in a message
_INT, _FLOAT, _BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"


def shorten(value: Any) -> str:
    """repr(value), cut to a length a one-line message can hold."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text):,} characters)"


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases, deep nesting, repeated keys, keys other than names and
    numbers, or YAML 1.1's implicit sexagesimal, octal and yes/no values."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        problem = ("aliases (*name) are not accepted" if self.check_event(yaml.AliasEvent) else
                   f"nested deeper than {MAX_DEPTH} levels" if self.depth >= MAX_DEPTH else "")
        if problem:
            raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            named = isinstance(key, (str, int)) and not isinstance(key, bool)  # (a config: names)
            if not named or key in seen:
                problem = (f"key {key!r} is given twice" if named else
                           f"key {shorten(key)} is not a name or a number")
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                   list("-+0123456789"))
StrictLoader.add_implicit_resolver(  # a float has a point or an exponent
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def parse_yaml(text: str) -> Any:
    """The value of a YAML document, read by StrictLoader (yaml.YAMLError if refused)."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; refuses (ConfigError naming the file) one that is
    missing, empty, larger than MAX_BYTES, not UTF-8, or not a mapping that StrictLoader accepts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a folder: name a YAML file in it"
                                                     if path.is_dir() else "does not exist"))
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_BYTES:,} bytes: not a config")
        data = path.read_bytes()
        tree = parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} is "
                          f"{data[err.start:err.start + 1]!r}); is it a YAML file?") from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not a valid config: {_yaml_problem(err)}") from err
    if tree is None:
        raise ConfigError(f"config file {path} is empty (no settings): it would run the built-in "
                          "demo; write the settings in it, or leave out -c to run the demo")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return tree


def write_yaml(config: Config, f: Any) -> None:
    """The resolved config as YAML into an open text file (see files.atomic_write)."""
    yaml.safe_dump(to_dict(config), f, sort_keys=False)


# Building the typed config

# The Python types a value may have for each scalar annotation (a bool is never a number).
_SCALARS = {type(None): type(None), bool: bool, int: int, float: (int, float), str: str}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9][0-9_:]*", value.strip()):
        hint = " (a number with a leading zero, `_` or `:` is not read as a number)"
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {shorten(value)}{hint}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, (str, int, float, bool, type(None))) and value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {shorten(value)} is not allowed; choose {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, option, value)
            except ConfigError:
                continue
        raise _wrong_type(key, tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        item = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if isinstance(value, _SCALARS.get(tp, ())) and (tp is bool or not isinstance(value, bool)):
        if tp is float and not math.isfinite(float(value)):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value) if tp is float else value
    raise _wrong_type(key, tp, value)


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    where = prefix.rstrip(".") or "top level"
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{where}: key {shorten(odd[0])} is not a name")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{shorten(unknown[0])[1:-1]} ({where} accepts: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping of {tp.__name__} fields")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, tp, value)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `section.key=value` strings into a nested dict; values are parsed as YAML values
    (StrictLoader). A key given again replaces the earlier value, as on most command lines."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {shorten(item)} is not of the form section.key=value")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            hint = f"quote text, e.g. '{key}=\"{raw[:20]}\"'"
            raise ConfigError(f"override {shorten(item)}: the value is not valid YAML "
                              f"({_yaml_problem(err)}); {hint}") from err
        *sections, name = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[name] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Build a Config from defaults, an optional base dict, a YAML file and dotted overrides.
    Nothing is imported or read besides the file: a backbone named as `module:Class` is imported
    when the model is built (models.build_model)."""
    tree = dict(base or {})
    if path is not None:
        try:
            tree = _merge(tree, read_yaml(path))
        except ConfigError as err:
            raise ConfigError(str(err) if str(path) in str(err) else f"{path}: {err}") from err
    config = _build(Config, _merge(tree, parse_overrides(list(overrides))))
    validate(config)
    # model.arch=path/to/file.py:Class gets the file's absolute path, so that the run's config.yaml
    # still names the file when test.py or a resume starts in another folder.
    where, _, name = config.model.arch.rpartition(":")
    if where.endswith(".py") and not Path(where).is_absolute():
        model = dataclasses.replace(config.model, arch=f"{os.path.abspath(where)}:{name}")
        config = dataclasses.replace(config, model=model)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""
    return {section: {key: list(v) if isinstance(v, tuple) else v for key, v in fields.items()}
            for section, fields in dataclasses.asdict(config).items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"inner": {"mask": "none"}} -> {"inner.mask": "none"}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def keys_with_role(*roles: str) -> frozenset[str]:
    """Dotted keys whose field has one of `roles` (pass None for fields without a role: those
    that change the experiment)."""
    return frozenset(f"{name}.{f.name}" for name, cls in typing.get_type_hints(Config).items()
                     for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)


# Keys a resume may change: they leave the saved weights, optimizer state and episode stream valid.
RESUMABLE = keys_with_role(SCHEDULE, HOUSEKEEPING)
# Keys in which runs may differ and still be seeds of one results cell.
SEED_POOLED = keys_with_role(HOUSEKEEPING, REPLICATE)


# Cross-field validation: each rule names the keys involved.

# Upper bounds far beyond any real run: a received config cannot make the program allocate
# without bound (a value past these is a typo or a crafted file).
LIMITS = {
    "data.num_ways": 10_000, "data.num_shots": 10_000, "data.num_query": 10_000,
    "data.image_size": 4096, "data.num_workers": 1024, "inner.steps": 100_000,
    "inner.eval_steps": 100_000, "outer.meta_batch_size": 100_000, "train.epochs": 10_000_000,
    "train.batches_per_epoch": 1_000_000_000, "train.num_val_tasks": 10_000_000,
    "train.num_test_tasks": 10_000_000, "train.eval_batch_size": 100_000,
    "run.keep_checkpoints": 100_000, "outer.max_bad_steps": 1_000_000_000,
}
MAX_WIDTH = 65_536  # channels of one block of model.widths

# A backbone of your own: `package.module:Class` or `path/to/file.py:Class` (checked, and imported,
# only when the model is built: see models.load_backbone_class).
_CUSTOM_ARCH = re.compile(r"[^:]+:[A-Za-z_][A-Za-z0-9_]*")


def is_custom_arch(arch: str) -> bool:
    """Whether model.arch names a backbone of your own (code that building the model imports)."""
    return ":" in arch


def validate(config: Config) -> None:
    """Reject values and combinations that cannot run, naming the keys."""
    r, d, m, i, o = config.run, config.data, config.model, config.inner, config.outer
    flat = flatten(to_dict(config))
    for key in ("data.num_ways", "data.num_shots", "data.num_query", "inner.steps",
                "inner.eval_steps", "outer.meta_batch_size", "train.epochs",
                "train.batches_per_epoch", "train.val_every", "train.num_val_tasks",
                "train.num_test_tasks", "train.eval_batch_size", "run.keep_checkpoints",
                "outer.max_bad_steps"):
        if flat[key] < 1:
            raise ConfigError(f"{key}: must be at least 1, got {flat[key]}")
    if d.num_ways < 2:
        raise ConfigError(f"data.num_ways: a classification task needs at least 2 ways, "
                          f"got {d.num_ways}")
    for key in ("inner.step_size", "outer.lr", "outer.mask_lr"):
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be positive, got {flat[key]}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"outer.momentum: must be in [0, 1), got {o.momentum}")
    if o.grad_clamp is not None and o.grad_clamp <= 0:
        raise ConfigError(f"outer.grad_clamp: must be positive or null, got {o.grad_clamp}")
    if d.image_size < 0 or d.num_workers < 0:
        raise ConfigError("data.image_size and data.num_workers must not be negative")
    if len(m.widths) != 4 or min(m.widths) < 1:
        raise ConfigError(f"model.widths: expected four positive channel counts, "
                          f"got {list(m.widths)}")
    if not (r.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", r.device)):
        raise ConfigError(f"run.device: expected auto, cpu, cuda or cuda:<index>, got {r.device!r}")
    # The run folder, seed and checkpoints
    if not r.name or "/" in r.name or "\\" in r.name or r.name in (".", ".."):
        raise ConfigError(f"run.name: expected a non-empty name without path separators, "
                          f"got {r.name!r}")
    if not r.dir and not r.out_dir:
        raise ConfigError("run.out_dir: must not be empty when run.dir is empty")
    if not 0 <= r.seed < 2**63:
        raise ConfigError(f"run.seed: must be in [0, 2**63), got {r.seed}")
    if r.checkpoint_every < 0:
        raise ConfigError(f"run.checkpoint_every: must not be negative (0: end of epoch only), "
                          f"got {r.checkpoint_every}")
    if r.resume == "auto" and not r.dir:
        raise ConfigError("run.resume=auto needs run.dir: the folder to continue (a timestamped "
                          "folder is new on every start)")
    if r.resume == "auto" and r.overwrite:
        raise ConfigError("run.resume=auto and run.overwrite=true contradict each other: "
                          "choose one")
    for key in ("train.val_from_epoch", "data.synthetic_seed", "data.num_test_query",
                "outer.reset_optimizer_every"):
        if flat[key] < 0:
            raise ConfigError(f"{key}: must not be negative, got {flat[key]}")
    # A built-in backbone name, or the form of a backbone of your own; nothing is imported.
    if is_custom_arch(m.arch) and not _CUSTOM_ARCH.fullmatch(m.arch):
        raise ConfigError(f"model.arch={shorten(m.arch)}: expected module:Class or "
                          "path/to/file.py:Class")
    if not is_custom_arch(m.arch) and m.arch not in BUILTIN_ARCHS:
        raise ConfigError(f"model.arch: {shorten(m.arch)} is not allowed; choose one of "
                          f"{', '.join(repr(a) for a in BUILTIN_ARCHS)} or a backbone of your "
                          "own as module:Class or path/to/file.py:Class")
    # The settings that only a dataset of your own (data.name=folder) takes
    if d.name == "folder":
        if d.image_size == 0:
            raise ConfigError("data.image_size: data.name=folder needs the side images are resized "
                              "to, e.g. data.image_size=84 (images of any size are accepted)")
        if d.download:
            raise ConfigError("data.download: data.name=folder reads your own folder; there is "
                              "nothing to download")
        if d.grayscale and d.normalize == "imagenet":
            raise ConfigError("data.normalize=imagenet needs colour images, but "
                              "data.grayscale=true: use data.normalize=train or none")
    elif d.grayscale:
        raise ConfigError(f"data.grayscale: only data.name=folder takes it (data.name={d.name})")
    elif d.normalize == "train":
        raise ConfigError(f"data.normalize=train: only data.name=folder computes train statistics "
                          f"(data.name={d.name}); choose auto, imagenet or none")
    # The smallest side that leaves a feature map: Conv4 has four 2x2 max-pools; ResNet-12 two,
    # then one padded.
    smallest = {"conv4": 16, "resnet12": 4}.get(m.arch, 0)
    if 0 < d.image_size < smallest:
        raise ConfigError(f"data.image_size: model.arch={m.arch} needs at least {smallest} pixels "
                          f"(or 0 for the dataset's size), got {d.image_size}")
    if i.mask == "none" and i.mask_init_shift != 0:
        raise ConfigError(f"inner.mask_init_shift={i.mask_init_shift} shifts a mask, but "
                          "inner.mask=none has no mask: set inner.mask or leave the shift at 0")
    if i.mask == "none" and (i.mask_target != "gradient" or i.mask_generator):
        raise ConfigError("inner.mask_target=weight and inner.mask_generator need a mask "
                          "function: set inner.mask (e.g. binary_ste)")
    # Settings that an implementation cannot run, refused with the reason
    if o.implementation == "compiled" and not i.first_order:
        raise ConfigError(
            "outer.implementation=compiled computes first-order outer gradients only: its query "
            "pass returns the gradient at the adapted weights, and a second-order gradient also "
            "differentiates the inner gradients. Use outer.implementation=loop (or reference) "
            "with inner.first_order=false")
    if o.compile_mode != "default" and o.implementation != "compiled":
        raise ConfigError(f"outer.compile_mode={o.compile_mode} applies to "
                          f"outer.implementation=compiled only, got {o.implementation}")
    if o.checkpoint_inner_steps and i.first_order:
        raise ConfigError("outer.checkpoint_inner_steps saves memory of second-order runs only "
                          "(a first-order run keeps no inner graph): set inner.first_order=false")
    if i.mask_target == "weight" and i.mask != "binary_ste":
        raise ConfigError(f"inner.mask_target=weight needs inner.mask=binary_ste, got {i.mask}")
    if i.mask_generator and i.mask_target != "gradient":
        raise ConfigError("inner.mask_generator works with inner.mask_target=gradient only")
    if i.mask_generator and i.adapt == "head":
        raise ConfigError("inner.mask_generator masks conv weights, but inner.adapt=head adapts "
                          "none")
    for key, limit in LIMITS.items():
        if flat[key] > limit:
            raise ConfigError(f"{key}: {flat[key]:,} is beyond any usable value (at most {limit:,})")
    if max(m.widths) > MAX_WIDTH:
        raise ConfigError(f"model.widths: {list(m.widths)} has a block wider than "
                          f"{MAX_WIDTH:,} channels")
