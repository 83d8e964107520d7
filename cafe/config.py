"""One typed config per run. YAML files and `--set a.b=value` overrides are views of these
dataclasses: every key is checked against them, so a typo or a wrong type fails early with
the key's name and the valid choices."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cafe.files import MAX_IMAGE_BYTES


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclasses below."""


@dataclass(kw_only=True, slots=True)
class TinySpec:
    """Sizes of the offline tiny LLaVA-OneVision (cafe.tiny); the defaults build in about a
    second on one core and learn the embedded scenes in minutes on two."""

    # tokenizer vocabulary trained on the corpus: room for every word and the chat scaffolding
    # as single tokens, as a real tokenizer has (a smaller one splits role names into pieces)
    vocab_size: int = 1024
    model_vocab_size: int = 0  # embedding rows, 0: the tokenizer's (a real size makes logits cost real)
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 96
    text_intermediate: int = 192
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    crops_wide: int = 1  # anyres grid: one base view plus up to this many crops side by side
    seed: int = 0


@dataclass(kw_only=True)
class ModelConfig:
    checkpoint: str = "runs/demo/base-model"  # any LLaVA-OneVision HF directory
    build_tiny_if_missing: bool = True  # build the offline tiny checkpoint at `checkpoint`
    tiny: TinySpec = field(default_factory=TinySpec)  # its sizes
    # when `checkpoint` is missing: the config of the LM-only stage that trains it (`cafe pretrain`),
    # so CAFe fine-tunes a model that already generates; empty: no such stage
    pretrain_config: str = ""
    # the packed step computes attention unit by unit with these kernels (cafe/attention.py)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    compile_blocks: bool = False  # torch.compile each transformer block (cafe.compile); ZeRO 0-2 only
    # the parts that train, by the research code's names; the rest is frozen (no gradient, no optimizer state)
    mm_tunable_parts: list[Literal["mm_vision_tower", "mm_mlp_adapter", "mm_language_model"]] = field(
        default_factory=lambda: ["mm_vision_tower", "mm_mlp_adapter", "mm_language_model"])


@dataclass(kw_only=True)
class ScenesConfig:
    """The embedded procedurally drawn data set."""

    train_images: int = 1200
    eval_images: int = 100
    image_size: int = 128
    seed: int = 0
    # share of training conversations that ask their question before the caption. Evaluation asks
    # every question about the image alone; asked after the caption, the answer is in the text
    # (docs/results.md has what the share did to QA and MMEB).
    question_first: float = 0.5


# How `pipelines.pairs` picks a row's contrastive pair text: one of these, or "column:NAME".
PAIR_TEXT_POLICIES = ("caption", "first_assistant", "longest_assistant", "none")
PAIR_TEXT_COLUMN = "column:"
PAIR_TEXT_CHOICES = "caption, first_assistant, longest_assistant, column:NAME or none"


def is_pair_text_policy(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(PAIR_TEXT_COLUMN):
        name = value.removeprefix(PAIR_TEXT_COLUMN)
        return bool(name) and name == name.strip()
    return value in PAIR_TEXT_POLICIES


@dataclass(kw_only=True)
class IngestConfig:
    """How `pipelines` converts the input. Only the first eight change the output bytes."""

    max_image_pixels: int = 25_000_000
    max_image_bytes: int = MAX_IMAGE_BYTES  # an image file larger than this is quarantined unread
    max_text_chars: int = 32_768
    max_side: int = 0  # resize keeping aspect so that max(width, height) <= max_side; 0: keep the size
    multimodal_input: bool = False  # derive query/target fields, for subsets that do not say
    pair_text: str = "caption"  # the pair-text policy of subsets whose dataset YAML entry does not say
    rows_per_shard: int = 512  # rows per work unit, hence at most this many rows per output shard
    compression: str = "zstd"  # text columns; encoded image columns are stored uncompressed
    executor: Literal["ray", "local"] = "ray"  # "local": the same units in a one-process loop
    # CPUs one conversion task asks Ray for. Fractional so that tasks fit beside training
    # workers on a shared node. On a node with nothing else to run, 1.0 is faster for short
    # jobs: with 0.5, Ray runs two tasks per CPU and starts workers beyond its one-per-CPU
    # soft limit, which it reaps after a second idle, so every short job pays their start-up.
    cpus_per_task: float = 0.5
    max_concurrent_tasks: int = 0  # cap on concurrent tasks; 0: as many as fit
    num_cpus: int = 0  # for ray.init when Ray is not running yet; 0: every CPU

    def __post_init__(self) -> None:
        if not is_pair_text_policy(self.pair_text):
            raise ConfigError(f"data.ingest.pair_text: {self.pair_text!r} is not one of {PAIR_TEXT_CHOICES}")


@dataclass(kw_only=True)
class DataConfig:
    raw_dir: str = "runs/demo/raw"  # OneVision-layout input (the scenes land here in the demo)
    dataset_yaml: str = ""  # subset selection; empty: every shard under raw_dir
    train_dir: str = "runs/demo/train"  # training Parquet written by pipelines
    quarantine_dir: str = "runs/demo/quarantine"
    eval_dir: str = "runs/demo/raw/eval"  # held-out evaluation files in public layouts (scenes write them here)
    max_text_tokens: int = 384
    max_turns: int = 0  # train on each conversation's first N exchanges (a user turn and its reply); 0: all
    ingest: IngestConfig = field(default_factory=IngestConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)


@dataclass(kw_only=True)
class LossConfig:
    compute_language_loss: bool = True
    compute_contrastive_loss: bool = True
    alpha_lm: float = 1.0
    con_weight: float = 1.0
    temperature: float = 0.05
    learnable_temperature: bool = False
    contrastive: Literal["infonce", "sigmoid"] = "infonce"
    emb_type: Literal["last", "mean"] = "last"
    multimodal_input: bool = False


@dataclass(kw_only=True)
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 0
    batch_size: int = 8  # per worker
    # examples per GradCache chunk (cafe.gradcache): the contrastive batch outgrows activation
    # memory, the gradient stays the full batch's; 0: the whole batch in one forward
    gradcache_chunk: int = 0
    # micro-batches per optimizer step (cafe.accumulation): batch_size rows split into this many
    # forwards, each its own contrastive batch; the LM term equals the unsplit batch's
    grad_accum_steps: int = 1
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state in host memory (DeepSpeed offload)
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs out
    lr: float = 1e-3
    temperature_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    warmup_ratio: float = 0.0  # warmup as a share of the run's steps; when > 0 it replaces warmup_steps
    vision_lr: float = 0.0  # the vision tower's learning rate (the research code's mm_vision_tower_lr); 0: lr
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: only the final one
    storage_path: str = ""  # where Ray Train keeps checkpoints (a folder or s3://...); empty: output_dir/ray_results
    max_failures: int = 0


SUITES = ("retrieval", "mmeb", "pope", "generation")


@dataclass(kw_only=True)
class EvalDataset:
    """One evaluation set. Relative paths are read under `data.eval_dir`."""

    name: str = "scenes"
    path: str = ""  # retrieval / pope / generation: a parquet file (or folder); mmeb: the folder of subsets
    image_root: str = ""  # where relative image paths point (MMEB's eval_images/, POPE's image folder)


@dataclass(kw_only=True)
class EvalSuite:
    suite: Literal["retrieval", "mmeb", "pope", "generation"] = "retrieval"
    datasets: list[EvalDataset] = field(default_factory=list)


def _scene_suites() -> list[EvalSuite]:
    """The embedded scenes in every suite (files written by `pipelines.scenes`)."""
    return [
        EvalSuite(suite="retrieval", datasets=[EvalDataset(path="retrieval/scenes/test.parquet")]),
        EvalSuite(suite="mmeb", datasets=[EvalDataset(path="mmeb/scenes", image_root="mmeb/scenes/eval_images")]),
        EvalSuite(suite="pope", datasets=[EvalDataset(path="pope/scenes/test.parquet")]),
        EvalSuite(suite="generation", datasets=[EvalDataset(path="generation/scenes/test.parquet")]),
    ]


@dataclass(kw_only=True)
class EvalConfig:
    suites: list[EvalSuite] = field(default_factory=_scene_suites)
    every_steps: int = 0  # score the suites on the live weights every N training steps; 0: only before/after
    batch_size: int = 32
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    mmeb_subsets: list[str] = field(default_factory=list)  # empty: every subset found
    # meta task of subsets outside the public 36 (the scenes' own, or yours)
    mmeb_meta_tasks: dict[str, str] = field(
        default_factory=lambda: {"SceneCaption_i2t": "retrieval", "SceneVQA": "vqa"})
    max_new_tokens: int = 24  # greedy decoding budget for POPE and QA answers
    qa_max_words: int = 3  # an assistant turn this short is a QA answer (exact match); longer ones are captions
    caption_samples: int = 4  # held-out captions generated greedily and shown in the report beside their truth


@dataclass(kw_only=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "cafe"
    run_name: str = "demo"


@dataclass(kw_only=True)
class SweepConfig:
    """A Ray Tune sweep over this experiment (`cafe sweep`). Every trial is this config with
    the sampled values set at their dotted keys."""

    name: str = ""  # the sweep's Tune run and MLflow parent run; empty: "<name>-sweep"
    # dotted config key -> grid(a, b, ...) | choice(a, b, ...) | uniform(lo, hi) | loguniform(lo, hi)
    search_space: dict[str, str] = field(default_factory=dict)
    # named variants, each a set of config values (e.g. lm_only: {loss.compute_contrastive_loss: false});
    # each trial runs one arm, crossed with search_space: the paper's ablation in one sweep
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1  # samples of the random distributions (each grid point runs this many times)
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits (each trial holds train.num_workers workers)
    # the scalar to optimise: a weighted sum of reported metrics (retrieval gain, caption-loss penalty, ...)
    objective: dict[str, float] = field(default_factory=lambda: {
        "eval/retrieval/scenes/i2t_r1": 0.5, "eval/retrieval/scenes/t2i_r1": 0.5,
        "eval/generation/scenes/caption_loss": -0.5})
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"  # asha: stop clearly worse trials at in-training evaluations
    grace_period: int = 1  # steps before ASHA may stop a trial
    reduction_factor: int = 2


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "demo"
    output_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric key: at least `low` (above it when `open_low`), at most `high`."""

    low: float
    high: float = math.inf
    open_low: bool = False

    def admits(self, value: float) -> bool:
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.high < math.inf:
            return f"within [{self.low:g}, {self.high:g}]"
        return f"{'>' if self.open_low else '>='} {self.low:g}"


COUNT, OPTIONAL_COUNT, NON_NEGATIVE = Bound(1), Bound(0), Bound(0)
POSITIVE, SHARE = Bound(0, open_low=True), Bound(0, 1)
# every numeric key's range (a test checks that none is missing); 0 means "off" or "all" where a key's comment says so
BOUNDS: dict[str, Bound] = {
    **{f"model.tiny.{name}": COUNT for name in (
        "vocab_size", "image_size", "patch_size", "vision_hidden", "vision_intermediate", "vision_layers",
        "vision_heads", "text_hidden", "text_intermediate", "text_layers", "text_heads", "text_kv_heads",
        "crops_wide")},
    "model.tiny.model_vocab_size": OPTIONAL_COUNT,
    "data.max_text_tokens": COUNT, "data.max_turns": OPTIONAL_COUNT,
    "data.ingest.max_image_pixels": COUNT, "data.ingest.max_image_bytes": COUNT,
    "data.ingest.max_text_chars": COUNT, "data.ingest.max_side": OPTIONAL_COUNT,
    "data.ingest.rows_per_shard": COUNT, "data.ingest.cpus_per_task": POSITIVE,
    "data.ingest.max_concurrent_tasks": OPTIONAL_COUNT, "data.ingest.num_cpus": OPTIONAL_COUNT,
    "data.scenes.train_images": COUNT, "data.scenes.eval_images": COUNT, "data.scenes.image_size": Bound(16),
    "data.scenes.question_first": SHARE,
    "loss.alpha_lm": NON_NEGATIVE, "loss.con_weight": NON_NEGATIVE, "loss.temperature": POSITIVE,
    "train.num_workers": COUNT, "train.cpus_per_worker": POSITIVE, "train.batch_size": COUNT,
    "train.gradcache_chunk": OPTIONAL_COUNT, "train.grad_accum_steps": COUNT, "train.epochs": COUNT,
    "train.max_steps": OPTIONAL_COUNT, "train.lr": POSITIVE, "train.temperature_lr": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE, "train.warmup_steps": OPTIONAL_COUNT, "train.warmup_ratio": SHARE,
    "train.vision_lr": NON_NEGATIVE, "train.grad_clip": NON_NEGATIVE, "train.log_every": COUNT,
    "train.checkpoint_every": OPTIONAL_COUNT, "train.max_failures": Bound(-1),  # -1: Ray retries without end
    "eval.every_steps": OPTIONAL_COUNT, "eval.batch_size": COUNT, "eval.num_actors": COUNT,
    "eval.cpus_per_actor": POSITIVE, "eval.max_new_tokens": COUNT, "eval.qa_max_words": COUNT,
    "eval.caption_samples": OPTIONAL_COUNT,
    "tune.num_samples": COUNT, "tune.max_concurrent_trials": OPTIONAL_COUNT, "tune.grace_period": COUNT,
    "tune.reduction_factor": Bound(2),
}
UNBOUNDED = {"model.tiny.seed", "data.scenes.seed", "train.seed", "train.zero_stage"}  # (a Literal: its choices)
# the run's name is a folder (Ray Train's run directory) and an MLflow search term: plain characters only
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def numeric_leaves(config: Any, prefix: str = "") -> dict[str, int | float]:
    """Every int and float field of a config, by dotted key (bools excluded)."""
    found: dict[str, int | float] = {}
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found.update(numeric_leaves(value, key + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = value
    return found


def check_values(config: ExperimentConfig) -> ExperimentConfig:
    """Values the types admit but a run cannot use, refused before anything starts: non-finite
    floats, numbers out of range, both losses off, a name that cannot be a folder."""
    for key, value in numeric_leaves(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value} is not a finite number")
        bound = BOUNDS.get(key)
        if bound is not None and not bound.admits(value):
            raise ConfigError(f"{key}: {value:g} is out of range; it must be {bound}")
    for key, weight in config.tune.objective.items():
        if not math.isfinite(weight):
            raise ConfigError(f"tune.objective[{key!r}]: {weight} is not a finite number")
    if any(k < 1 for k in config.eval.recall_ks):
        raise ConfigError(f"eval.recall_ks: {config.eval.recall_ks} must all be >= 1")
    if not (config.loss.compute_language_loss or config.loss.compute_contrastive_loss):
        raise ConfigError("loss.compute_language_loss and loss.compute_contrastive_loss are both false: "
                          "turn at least one loss on")
    for key, name in (("name", config.name), ("tune.name", config.tune.name or config.name)):
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{key}: {name!r} must start with a letter or digit and use only letters, digits, "
                              "'.', '_' and '-' (it names the run's folder and its MLflow key)")
    return config


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(hint)]}, "
                              f"got {value!r}")
        return _build(hint, value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(value == c and type(value) is type(c) for c in choices):  # True is not 1
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, f"{key} key"): _coerce(v, value_type, f"{key}[{k!r}]") for k, v in value.items()}
    if hint is Any:  # a value checked where it is used (a sweep arm's config values)
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unions are not supported in configs")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and hint is not bool or not isinstance(value, hint):  # bool is an int subclass
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r}; valid keys here: {names}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    *path, leaf = dotted.strip().split(".")
    node = raw
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = _parse_yaml(text, f"--set {assignment}") if text.strip() else ""  # `key=` clears a text setting


def _parse_yaml(text: str, where: str) -> Any:
    """YAML (safe: no Python tags), or a ConfigError naming `where`, the line and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        place = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{place}: not valid YAML ({problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """ExperimentConfig from a YAML file (or the defaults) plus `a.b=value` overrides."""
    raw: dict = {}
    if path is not None:
        raw = _parse_yaml(Path(path).read_text(), str(path))
        if raw is None:  # an empty file would silently run every default, output paths included
            raise ConfigError(f"{path} is empty: a config sets at least name and output_dir "
                              "(configs/demo.yaml is a complete example)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    return check_values(_build(ExperimentConfig, raw))


def to_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to dotted keys, e.g. for MLflow params."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, key + "."))
        elif isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            flat[key] = [dataclasses.asdict(v) for v in value]  # readable as a param, like the YAML
        else:
            flat[key] = value
    return flat


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def config_from_dict(raw: dict) -> ExperimentConfig:
    """Rebuild (and re-validate) a config from `dataclasses.asdict` output, e.g. on a worker."""
    return check_values(_build(ExperimentConfig, raw))


PATH_FIELDS = ("output_dir", "train.storage_path", "model.checkpoint", "model.pretrain_config", "data.raw_dir",
               "data.dataset_yaml", "data.train_dir", "data.quarantine_dir", "data.eval_dir")


def with_absolute_paths(config: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """Local paths (and a relative SQLite tracking store) made absolute against `base` (default:
    the working directory), so Ray workers, whose working directory differs, see the same files.
    URIs such as s3:// are left as they are."""
    base = Path(base or Path.cwd())
    config = dataclasses.replace(config)
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        owner = config
        for part in parents:
            setattr(owner, part, dataclasses.replace(getattr(owner, part)))
            owner = getattr(owner, part)
        value = getattr(owner, leaf)
        if value and "://" not in value and not Path(value).is_absolute():
            setattr(owner, leaf, str(base / value))
    uri = config.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        config.tracking = dataclasses.replace(config.tracking, tracking_uri=f"sqlite:///{base / uri[len('sqlite:///'):]}")
    return config
