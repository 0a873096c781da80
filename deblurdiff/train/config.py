"""Training configuration: dataclasses, and loading from JSON, YAML or TOML.

A configuration file has up to five sections; every key is optional (defaults
below, which follow the reference's ``configs/train/train.yaml`` where it has one).
See ``configs/train_example.yaml`` for a commented example.

::

    output_dir: runs/deblurdiff
    seed: 231
    model:      {init, path, ...}          # ModelConfig
    data:       {type, root, ...}          # DataConfig (+ degradation: DegradationConfig)
    training:   {max_steps, batch_size, ...}  # OptimConfig
    validation: {every_steps, ...}         # ValidationConfig
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .degradation import DegradationConfig

MODEL_INITS = ("stable-diffusion", "pipeline", "single-file", "tiny-random")


def _from_dict(cls, values: dict | None, where: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in `{where}`; known: {sorted(known)}")
    return cls(**values)


@dataclass
class ModelConfig:
    """Where the weights come from.

    ``init``:
      * ``stable-diffusion``: ``path`` is a Stable Diffusion 2.1-base diffusers folder or Hub id
        (a local copy or a mirror: Stability AI removed the original Hub repository in 2025).
        UNet, VAE and text encoder are loaded (and frozen); the ControlNet is initialised from
        the UNet's encoder (extra input channels zero), the LKPN from scratch with its output
        layers zero (``LKPNModel.zero_init``: it starts as the identity, ``z_s = c``).
      * ``pipeline``: ``path`` is a DeblurDiff pipeline folder (ours, e.g. a training checkpoint):
        training continues from its ControlNet and LKPN.
      * ``single-file``: ``path`` is the official checkpoint (``model.pth``); ``tokenizer`` as for
        ``DeblurDiffPipeline.from_single_file``.
      * ``tiny-random``: tiny random components (tests and smoke runs only).
    """

    init: str = "stable-diffusion"
    path: str | None = None
    revision: str | None = None
    variant: str | None = None
    tokenizer: str | None = None
    # Overrides of the LKPN's architecture (LKPNModel arguments) for `stable-diffusion` init.
    lkpn: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.init not in MODEL_INITS:
            raise ValueError(f"model.init must be one of {list(MODEL_INITS)}, got {self.init!r}")
        if self.init in ("pipeline", "single-file") and not self.path:
            raise ValueError(f"model.init={self.init!r} needs model.path")


@dataclass
class DataConfig:
    """``type: paired`` reads ``root/sharp`` + ``root/blurry`` (or ``sharp_dir`` + ``blurry_dir``);
    ``type: synthetic`` degrades the sharp images of ``sharp_dir`` (or ``root``) on the fly."""

    type: str = "synthetic"
    root: str | None = None
    sharp_dir: str | None = None
    blurry_dir: str | None = None
    resolution: int | None = 512
    random_crop: bool = True
    random_flip: bool = True
    prompt: str = ""
    num_workers: int = 4
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def __post_init__(self):
        if isinstance(self.degradation, dict) or self.degradation is None:
            self.degradation = DegradationConfig.from_dict(self.degradation)
        if self.type not in ("paired", "synthetic"):
            raise ValueError(f"data.type must be 'paired' or 'synthetic', got {self.type!r}")

    def folders(self) -> tuple[Path, Path | None]:
        root = Path(self.root) if self.root else None
        if self.type == "paired":
            sharp = Path(self.sharp_dir) if self.sharp_dir else (root / "sharp" if root else None)
            blurry = Path(self.blurry_dir) if self.blurry_dir else (root / "blurry" if root else None)
            if sharp is None or blurry is None:
                raise ValueError(
                    "paired data needs `root` (holding sharp/ and blurry/) or `sharp_dir` and `blurry_dir`"
                )
            return sharp, blurry
        sharp = Path(self.sharp_dir) if self.sharp_dir else root
        if sharp is None:
            raise ValueError("synthetic data needs `sharp_dir` (a folder of sharp images)")
        return sharp, None


@dataclass
class OptimConfig:
    max_steps: int = 200_000
    # Per process; the reference's 64 was global (split over its GPUs).
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Images per optimizer step over all processes; when set, the accumulation is derived:
    # global_batch_size / (batch_size x processes), which must be a whole number.
    global_batch_size: int | None = None
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # diffusers.optimization.get_scheduler names: constant (the reference's), constant_with_warmup, cosine, linear...
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    # Loss = noise_loss_weight * MSE(eps) + lkpn_loss_weight * MSE(z_s, z_0)
    #      + pixel_loss_weight * MSE(VAE.decode(z_s), sharp)   (the reference: 1, 1, 0).
    noise_loss_weight: float = 1.0
    lkpn_loss_weight: float = 1.0
    pixel_loss_weight: float = 0.0
    log_every: int = 50
    checkpoint_every: int = 4000
    checkpoints_total_limit: int | None = None
    # null, "latest" or a checkpoint folder.
    resume_from_checkpoint: str | None = None
    # An accelerate tracker ("tensorboard", "wandb", ...) besides the JSONL log, or null.
    report_to: str | None = None

    def __post_init__(self):
        if self.mixed_precision is False or self.mixed_precision is None:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"training.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError("training.global_batch_size must be >= 1 (or null)")

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step: ``gradient_accumulation_steps``, or what gives
        ``global_batch_size`` images per step over ``num_processes`` processes."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.batch_size * num_processes
        steps, rest = divmod(self.global_batch_size, per_step)
        if rest or steps < 1:
            raise ValueError(
                f"training.global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                f"{self.batch_size} x {num_processes} process(es)"
            )
        if self.gradient_accumulation_steps not in (1, steps):
            raise ValueError(
                f"training.gradient_accumulation_steps {self.gradient_accumulation_steps} contradicts "
                f"global_batch_size {self.global_batch_size} ({steps} with batch_size {self.batch_size} x "
                f"{num_processes} process(es)); set only one of them"
            )
        return steps


@dataclass
class ValidationConfig:
    """Every ``every_steps`` optimizer steps (0: never), restore ``num_images`` images and save a
    grid (blurry | restored | sharp per row). Images come from the section's own data settings
    when ``type`` is given (same keys as ``data``), else from the training data (centre crops)."""

    every_steps: int = 1000
    num_images: int = 4
    num_inference_steps: int = 50
    seed: int = 0
    type: str | None = None
    root: str | None = None
    sharp_dir: str | None = None
    blurry_dir: str | None = None
    resolution: int | None = None

    def data_config(self, train: DataConfig) -> DataConfig:
        if self.type is None:
            base = asdict(train)
            base.update(random_crop=False, random_flip=False, num_workers=0)
            if self.resolution is not None:
                base["resolution"] = self.resolution
            return DataConfig(**base)
        return DataConfig(
            type=self.type,
            root=self.root,
            sharp_dir=self.sharp_dir,
            blurry_dir=self.blurry_dir,
            resolution=self.resolution if self.resolution is not None else train.resolution,
            random_crop=False,
            random_flip=False,
            prompt=train.prompt,
            num_workers=0,
            degradation=train.degradation,
        )


@dataclass
class TrainConfig:
    output_dir: str = "runs/deblurdiff"
    seed: int = 231
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values or {})
        sections = {"model": ModelConfig, "data": DataConfig, "training": OptimConfig, "validation": ValidationConfig}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; known: {sorted(known)}")
        kwargs = {k: v for k, v in values.items() if k not in sections}
        for name, section in sections.items():
            kwargs[name] = _from_dict(section, values.get(name), name)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(value):
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_config_file(path: str | Path) -> dict:
    """A configuration file as a dict: ``.json``, ``.yaml``/``.yml`` or ``.toml``."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # PyYAML comes with transformers/accelerate, but be explicit
            raise ImportError("reading a YAML config needs PyYAML; use a .json or .toml config instead") from exc
        return yaml.safe_load(text) or {}
    raise ValueError(f"config must be .json, .yaml/.yml or .toml, got {path.name}")


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``["training.max_steps=10", "model.init=tiny-random"]`` -> nested updates.

    Values are parsed as JSON when they can be (numbers, lists, null, true), else kept as strings."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = values
        *parents, leaf = dotted.strip().split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
        node[leaf] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values = read_config_file(path) if path else {}
    return TrainConfig.from_dict(apply_overrides(values, overrides or []))
