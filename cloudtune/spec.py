"""The JobSpec: one description of a fine-tuning job, read by the planner and by the trainer.

Why one spec: what the planner estimates must be what the trainer runs (same model, method,
sequence length, batch, optimizer, checkpointing). `cloudtune run job.yaml` validates it, the
planner sizes it, the orchestrator ships it (as JSON) to the machine, and `python -m
cloudtune.trainer` reads it back. Unknown keys are errors (with the nearest valid key), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloudtune.errors import SpecError

Method = Literal["full", "lora", "qlora"]
Stage = Literal["sft", "dpo"]
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
)
# Names users type for an optimizer above (the trainer and the planner see the canonical name).
OPTIMIZER_ALIASES = {"adamw": "adamw_torch"}
FullPrecision = Literal["bf16", "mixed"]


# transformers' SchedulerType values (transformers 4.5x); spelled here so the CLI checks a spec without
# importing transformers. tests/test_bad_input.py compares this with the installed transformers.
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)
# A job name becomes part of store keys, log file names and table cells: keep it to a safe charset.
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# S3 bucket naming rules (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# How much of an offending value an error message echoes (a hostile spec must not print megabytes).
EXCERPT_CHARS = 80


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A bounded repr of value: errors name the value without echoing a whole input (reprlib stops at a
    few levels and items, so a YAML alias bomb's billion strings are never even visited)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# A spec is a few KB; anything far larger is a mistake (or hostile) and is refused before parsing.
MAX_SPEC_BYTES = 1 << 20
# YAML aliases are legitimate, but a handful of nested ones expand exponentially ("billion laughs").
MAX_YAML_ALIASES = 100


def _yaml_load(text: str) -> Any:
    """yaml.safe_load that refuses more than MAX_YAML_ALIASES alias uses."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > MAX_YAML_ALIASES:
                    raise SpecError(f"uses more than {MAX_YAML_ALIASES} YAML aliases (*name); write the values out")
            return super().compose_node(parent, index)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Strict):
    rank: int = Field(16, description="LoRA rank r")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scaling = alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = Field(
        "all-linear", description="'all-linear', 'attention', or module names such as q_proj,v_proj"
    )

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"lora rank must be >= 1, got {v}; use e.g. 8, 16 or 64")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v not in ("all-linear", "attention"):
            v = [t.strip() for t in v.split(",") if t.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("lora targets is empty; use 'all-linear', 'attention' or q_proj,v_proj")
        return v


class DataSpec(_Strict):
    train: str = Field(..., description="local .jsonl/.json/.parquet path, s3:// URL or hub dataset id")
    format: DataFormat = "auto"
    validation: str | None = None
    val_split: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("train")
    @classmethod
    def _train_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data.train is empty; give a .jsonl/.json/.parquet path, s3:// URL or hub dataset id")
        return v
    packing: bool = False
    max_seq_len: int = 2048
    text_field: str = "text"

    @field_validator("max_seq_len")
    @classmethod
    def _seq(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {v}; typical values are 512-8192")
        return v


class TrainingSpec(_Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the data; > 0")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; wins over epochs")
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = True
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    precision: Precision = "auto"
    # Full fine-tuning only: "bf16" keeps the weights (and AdamW's states, which follow the param dtype)
    # in bf16, as Axolotl/torchtune/litgpt do (~8 B/param); "mixed" keeps fp32 master weights under bf16
    # autocast (~18 B/param). bf16 needs a bf16 compute precision; otherwise the trainer uses mixed.
    full_precision: FullPrecision = "bf16"
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb, mlflow")
    tracker_env: list[str] = Field(
        default_factory=list,
        description="extra environment variable names sent to the machine as secrets for the trackers "
                    "(WANDB_API_KEY etc. are sent for report_to: [wandb] without listing them)",
    )

    @field_validator("tracker_env")
    @classmethod
    def _tracker_env(cls, v: list[str]) -> list[str]:
        import re

        bad = [n for n in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ValueError(f"tracker_env {bad[0]!r} is not an environment variable name; list names such as "
                             "WANDB_API_KEY, not values")
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _sched(cls, v: str) -> str:
        if v not in LR_SCHEDULERS:
            near = difflib.get_close_matches(v, LR_SCHEDULERS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown lr_scheduler {excerpt(v)}; {hint}choose one of {', '.join(LR_SCHEDULERS)}")
        return v

    @field_validator("optimizer")
    @classmethod
    def _opt(cls, v: str) -> str:
        v = OPTIMIZER_ALIASES.get(v, v)
        if v not in OPTIMIZERS:
            near = difflib.get_close_matches(v, OPTIMIZERS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown optimizer {v!r}; {hint}choose one of {', '.join(OPTIMIZERS)} "
                             f"(or {', '.join(f'{a}={c}' for a, c in OPTIMIZER_ALIASES.items())})")
        return v


class DpoSpec(_Strict):
    beta: float = Field(0.1, gt=0)
    base_adapter: str | None = Field(None, description="SFT adapter to start from (path or store URL)")


class CheckpointSpec(_Strict):
    every_steps: int | None = Field(50, ge=1, description="null: no step checkpoints")
    every_minutes: float | None = Field(10.0, gt=0, description="null: no timed checkpoints")
    keep: int = Field(2, ge=1)


class StoreSpec(_Strict):
    url: str = Field("", description="file:///path or s3://bucket/prefix; default: $CLOUDTUNE_HOME/store")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (R2, MinIO, moto)")
    region: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not (v.startswith("file://") or v.startswith("s3://") or v.startswith("/")):
            raise ValueError(f"store url {v!r} must start with file:// or s3://")
        if v.startswith("/"):
            v = "file://" + v
        if v.startswith("s3://"):
            bucket = v[len("s3://"):].split("/", 1)[0]
            if not BUCKET_RE.match(bucket) or ".." in bucket:
                raise ValueError(f"S3 bucket name {excerpt(bucket)} is not valid: 3-63 characters of a-z, 0-9, "
                                 f"'.' and '-', starting and ending with a letter or digit; e.g. s3://my-bucket/jobs")
        return v


Sharding = Literal["none", "ddp", "fsdp", "zero2", "zero3"]


class ResourcesSpec(_Strict):
    provider: str | list[str] | None = Field(None, description="provider name(s); default: local")
    gpus: int | None = Field(None, ge=1, le=1024, description="force N GPUs in total (data parallel, sharded)")
    nodes: int = Field(1, ge=1, le=128, description="machines; gpus is split evenly across them")
    sharding: Sharding | None = Field(None, description="auto (None), none, ddp, fsdp, zero2 or zero3")
    gpu: str | None = Field(None, description="force a GPU model, e.g. H100-SXM")
    spot: bool | None = Field(None, description="None: consider both")
    max_price_hr: float | None = Field(None, gt=0)
    region: str | None = None
    # A public CUDA PyTorch image: the machine installs the wheel `run` staged (cloudtune/run/bootstrap.py).
    # Set it to an images/trainer build for the fast path (no install at start-up).
    image: str = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
    disk_gb: int | None = Field(None, ge=1)


    @field_validator("sharding", mode="before")
    @classmethod
    def _auto_sharding(cls, v: Any) -> Any:
        return None if v in ("auto", "") else v

    @model_validator(mode="after")
    def _shape(self) -> ResourcesSpec:
        gpus = self.gpus or 1
        if self.gpus is not None and self.gpus % self.nodes:
            raise ValueError(f"gpus {self.gpus} does not split evenly over nodes {self.nodes}; "
                             f"use a multiple of {self.nodes}")
        if self.nodes > 1 and self.gpus is None:
            raise ValueError(f"nodes {self.nodes} needs gpus (the total over all nodes, e.g. {8 * self.nodes})")
        if self.sharding == "none" and gpus > 1:
            raise ValueError(f"sharding none means one GPU, but gpus is {gpus}; use ddp or fsdp")
        return self


class LimitsSpec(_Strict):
    max_hours: float | None = Field(None, gt=0)
    max_cost_usd: float | None = None
    # Below a few seconds every healthy machine looks hung (the trainer beats every <= 30 s by default).
    heartbeat_timeout_s: float = Field(900.0, ge=5.0)
    max_restarts: int = Field(5, ge=0)


class LocalSpec(_Strict):
    """Knobs of the local provider, mainly to simulate spot preemption in tests and demos."""

    preempt_after_s: float | None = Field(None, gt=0)
    preempt_every_s: float | None = Field(None, gt=0)
    preempt_random: bool = False
    preempt_max: int | None = Field(None, ge=0, description="preempt only attempts 1..N (None: no limit)")
    preempt_clock: Literal["machine", "training"] = Field(
        "machine", description="count preemption time from machine start, or from the first training heartbeat"
    )
    notice_s: float = Field(5.0, ge=0)
    preempt_node: int | None = Field(None, ge=0, description="with resources.nodes > 1: the node preempted "
                                     "(default: the last); a spot market takes one machine at a time")
    seed: int = 0
    price_hr: float = Field(0.0, ge=0)


class JobSpec(_Strict):
    name: str = "job"
    model: str = Field(..., description="hub id, local directory, or planner shorthand such as 8b")
    method: Method = "lora"
    quant_bits: Literal[4, 8, 16] | None = None
    stage: Stage = "sft"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    local: LocalSpec = Field(default_factory=LocalSpec)
    merge: bool = False
    # The user's environment variables a machine gets (cloudtune/run/forward_env.py): plain ones, and
    # secret ones (redacted in --dry-run/logs/state). Nothing else is forwarded but HF_TOKEN and the store's.
    env: list[str] = Field(default_factory=list, description="names of environment variables to forward")
    secrets: list[str] = Field(default_factory=list, description="names forwarded as secret env, never printed")

    @field_validator("env", "secrets")
    @classmethod
    def _env_names(cls, v: list[str], info: Any) -> list[str]:
        from cloudtune.run.forward_env import check_names

        return check_names(v, info.field_name)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not JOB_NAME_RE.match(v):
            raise ValueError(f"job name {excerpt(v)} may only use letters, digits, '.', '_' and '-' (at most 64, "
                             f"starting with a letter or digit); e.g. name: my-job-1")
        return v


    @model_validator(mode="after")
    def _method_bits(self) -> JobSpec:
        if self.method == "qlora":
            if self.quant_bits is None:
                self.quant_bits = 4
            elif self.quant_bits not in (4, 8):
                raise ValueError(f"qlora needs quant_bits 4 or 8, got {self.quant_bits}; use method lora for 16-bit")
        elif self.quant_bits not in (None, 16):
            raise ValueError(f"quant_bits {self.quant_bits} needs method qlora")
        sharded = self.resources.sharding in ("fsdp", "zero3")
        if sharded and self.method == "qlora" and self.quant_bits == 8:
            raise ValueError(f"8-bit QLoRA cannot be sharded with {self.resources.sharding}: bitsandbytes int8 weights "
                             "have no quant_storage dtype to shard; use quant_bits 4 (FSDP-QLoRA) or sharding ddp")
        if sharded and self.stage == "dpo":
            raise ValueError(f"stage dpo with resources.sharding {self.resources.sharding} is not supported (TRL's "
                             "reference model would need sharding too); use sharding ddp, or one GPU")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _nearest(key: str, model: type[BaseModel]) -> str:
    near = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else f" (valid keys: {', '.join(model.model_fields)})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _explain(err: ValidationError, source: str) -> SpecError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    where = ".".join(str(p) for p in loc) or "<top>"
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        return SpecError(f"{source}: unknown key {where!r}{_nearest(str(loc[-1]), parent)}")
    if e["type"] == "missing":
        return SpecError(f"{source}: missing required key {where!r}")
    msg = e["msg"].removeprefix("Value error, ")
    return SpecError(f"{source}: {where}: {msg} (got {excerpt(e.get('input'))})")


def parse_spec(data: dict[str, Any], source: str = "spec") -> JobSpec:
    """Validate a mapping into a JobSpec, turning pydantic's report into one clear line."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of keys (model, method, data, ...), got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON job spec. Relative data/model paths are resolved against the spec's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"job spec {str(p)!r} not found; pass the path of a YAML file such as examples/quickstart.yaml")
    size = p.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"job spec {str(p)!r} is {size} bytes; a spec is a few KB (at most {MAX_SPEC_BYTES}), "
                        f"check that this is the right file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpecError(f"{p}: not UTF-8 text (byte {err.start}, line {line}: {excerpt(raw[err.start:err.start + 4])}); "
                        f"save the file as UTF-8") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else _yaml_load(text)
    except SpecError as err:
        raise SpecError(f"{p}: {err}") from None
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to be a job spec") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{p}: malformed YAML at {where}: {str(problem)[:120]}") from None

    except json.JSONDecodeError as err:
        raise SpecError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    spec = parse_spec(data or {}, source=str(p))
    return resolve_relative_paths(spec, p.parent)


def resolve_relative_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Make relative local paths in the spec absolute, so the job runs from any working directory."""
    def fix(value: str | None) -> str | None:
        if not value or "://" in value or Path(value).is_absolute():
            return value
        candidate = (base / value).resolve()
        return str(candidate) if candidate.exists() or value.startswith(".") else value

    spec.data.train = fix(spec.data.train) or spec.data.train
    spec.data.validation = fix(spec.data.validation)
    spec.model = fix(spec.model) or spec.model
    spec.dpo.base_adapter = fix(spec.dpo.base_adapter)
    return spec
