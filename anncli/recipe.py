"""The recipe: a typed schema, loaded from YAML with `a.b=c` overrides (anncli.recipe_yaml).

Every key of a recipe file is validated; an unknown key, a wrong type or a bad value becomes one
`RecipeError` line naming the file and the dotted key. Key names are a public interface: scripts and
the SLURM templates set them with `--set`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anncli.recipe_yaml import RecipeError, format_error, parse_override, read_tree, set_dotted


_NUMBERS = (int, float, Optional[int], Optional[float])
# model.pretrained, --init-from and --checkpoint: a local path or one of these (anncli/interop/sources.py)
WEIGHTS_SCHEMES = ("http://", "https://", "open-mmlab://", "mmseg://")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        """YAML's true/false are not numbers: pydantic would take `iters: true` as 1."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation in _NUMBERS:
                    raise ValueError(f"{key}: expected a number, got {str(value).lower()}")
        return data


class ModelConfig(_Section):
    variant: Literal["official", "mmseg"] = "official"  # MendelXu/ANN or mmsegmentation's ANN (models/mmseg.py)
    name: Literal["ann", "fcn", "nonlocal"] = "ann"
    backbone: Literal["resnet50", "resnet101", "small"] = "resnet101"
    num_classes: int = Field(19, ge=1, le=255)
    output_stride: Literal[8, 16] = 8
    norm: Literal["syncbn", "bn"] = "syncbn"
    aux: bool = True
    key_channels: int = Field(256, ge=1)
    value_channels: int = Field(256, ge=1)
    psp_sizes: list[int] = Field(default_factory=lambda: [1, 3, 6, 8], min_length=1)
    psp_pool: Literal["avg", "max"] = "avg"
    attention: Literal["explicit", "sdpa"] = "explicit"
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    pretrained: Optional[str] = None
    # channels_last memory format (NHWC) for weights and inputs; auto: on CUDA, off on CPU
    channels_last: Union[bool, Literal["auto"]] = "auto"
    compile: bool = False  # torch.compile of the network for training (`ann train --compile`)
    compile_backend: str = Field("inductor", min_length=1)  # torch.compile backend, e.g. aot_eager to debug
    align_corners: Optional[bool] = None  # logits resize; null: True for official, False for mmseg

    @model_validator(mode="after")
    def _variant(self) -> "ModelConfig":
        if self.variant == "mmseg" and (self.name == "fcn" or self.backbone == "small"):
            raise ValueError("variant mmseg: needs name ann or nonlocal and backbone resnet50 or resnet101")
        return self

    @field_validator("pretrained")
    @classmethod
    def _weights_source(cls, value: Optional[str]) -> Optional[str]:
        if value and "://" in value and not value.startswith(WEIGHTS_SCHEMES):
            raise ValueError("expected a local path, an http(s):// URL, open-mmlab://NAME or mmseg://CONFIG")
        return value

    @property
    def resolved_align_corners(self) -> bool:
        return self.variant == "official" if self.align_corners is None else self.align_corners


class SynthConfig(_Section):
    """Parameters of the synthetic long-range set, created under data.root when missing."""

    train: int = Field(2048, ge=1)
    val: int = Field(256, ge=1)
    size: tuple[int, int] = (64, 128)
    seed: int = 0
    max_samples: int = Field(256, ge=1)


class DataConfig(_Section):
    dataset: Literal["cityscapes", "ade20k", "pascal_context", "voc12aug", "synth"] = "cityscapes"
    root: str = "data/cityscapes"
    train: str = "cityscapes-train-{000000..000029}.tar"
    val: str = "cityscapes-val-{000000..000004}.tar"
    num_workers: int = Field(4, ge=0)
    lanes: int = Field(16, ge=1, description="forward-read lanes of the global sample order (data/order.py)")
    max_skip_fraction: float = Field(0.01, ge=0.0, le=1.0)
    max_member_mb: int = Field(256, ge=1, description="bytes of one tar member at most, in MiB")
    max_pixels: int = Field(64_000_000, ge=1, description="pixels of one decoded image or label at most")
    retries: int = Field(2, ge=0, le=20, description="retries of a failed pipe:/http shard read, with backoff, before a cut")
    synth: Optional[SynthConfig] = None


class AugmentConfig(_Section):
    crop: tuple[int, int] = (769, 769)
    base_size: Optional[tuple[int, int]] = None
    scale: tuple[float, float] = (0.5, 2.0)
    aspect: Optional[tuple[float, float]] = (0.9, 1.1)
    cat_max_ratio: float = Field(0.75, gt=0.0, le=1.0)
    flip: float = Field(0.5, ge=0.0, le=1.0)
    photometric: Literal["none", "mmseg", "brightness"] = "brightness"
    brightness_delta: int = Field(10, ge=0, le=255)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    bgr: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        if self.crop[0] < 1 or self.crop[1] < 1:
            raise ValueError("crop: both sides must be positive")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError("scale: expected 0 < low <= high")
        if self.aspect is not None and not 0 < self.aspect[0] <= self.aspect[1]:
            raise ValueError("aspect: expected 0 < low <= high")
        return self


class LossConfig(_Section):
    ohem: bool = True
    ohem_thresh: float = Field(0.7, gt=0.0, le=1.0)
    ohem_min_kept: int = Field(100_000, ge=1)  # the official code keeps max(1, min_kept); 0 is refused
    aux_weight: float = Field(0.4, ge=0.0)
    class_weights: Optional[list[float]] = None
    normalize: Literal["process", "global"] = "process"


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0.0)
    poly_power: float = Field(0.9, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0.0)


class TrainConfig(_Section):
    iters: int = Field(60_000, ge=1)
    batch_size: int = Field(1, ge=1, le=1024, description="images per process per micro-step")
    world_size: int = Field(8, ge=1, description="processes the recipe was written for")
    accum_steps: int = Field(1, ge=1)
    lr_scaling: Literal["none", "linear"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    checkpoint_every: int = Field(4000, ge=1)
    keep_last: int = Field(3, ge=1)
    val_every: int = Field(0, ge=0)
    log_every: int = Field(50, ge=1)
    max_bad_steps: int = Field(5, ge=1)
    tensorboard: bool = False
    trace_samples: bool = False
    deterministic: bool = False  # deterministic algorithms, no cuDNN autotuning (slower; README)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2] = 1


class EvalConfig(_Section):
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    flip: bool = False
    mode: Literal["whole", "slide"] = "whole"
    crop: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    merge: Literal["logits", "softmax"] = "logits"
    resize_short: Optional[int] = None
    max_long: Optional[int] = None
    size_divisor: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # sliding windows of one image and scale per forward; auto: from free memory on CUDA, a few on CPU
    batch_windows: Union[int, Literal["auto"]] = "auto"

    @field_validator("batch_windows", mode="before")
    @classmethod
    def _batch_windows(cls, value):
        if value != "auto" and (type(value) is not int or value < 1):
            raise ValueError("expected auto or an integer >= 1")
        return value

    @model_validator(mode="after")
    def _window(self) -> "EvalConfig":
        if any(not 0 < s <= 4 for s in self.scales):
            raise ValueError("scales: every scale must be > 0 and at most 4")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ValueError("slide mode needs eval.crop and eval.stride")
        if self.crop and self.stride and (self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]):
            raise ValueError("stride: must not be larger than the crop")
        return self


class WandbConfig(_Section):
    """Weights & Biases: offline writes runs under the run directory's wandb/ for `wandb sync`."""

    project: str = Field(min_length=1)
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the recipe name
    mode: Literal["online", "offline", "disabled"] = "online"


class MlflowConfig(_Section):
    tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else mlflow's default (sqlite:///mlflow.db)
    experiment: Optional[str] = None  # null: the recipe name
    run_name: Optional[str] = None  # null: the recipe name


class LoggingConfig(_Section):
    """Experiment trackers that rank 0 logs to, beside events.jsonl (train/trackers/)."""

    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    engine: Literal["ddp", "deepspeed"] = "ddp"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        weights = self.loss.class_weights
        if weights is not None and len(weights) != self.model.num_classes:
            raise ValueError(
                f"loss.class_weights: {len(weights)} weights for model.num_classes={self.model.num_classes}"
            )
        return self

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.world_size * self.train.accum_steps


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is one `RecipeError` line."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{source}: " + ("is a directory, not a recipe file" if p.is_dir() else "recipe file not found"))
    tree = read_tree(p, source)
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: expected a mapping of sections at the top level")
    tree.setdefault("name", p.stem)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value, source)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(format_error(source, e)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
