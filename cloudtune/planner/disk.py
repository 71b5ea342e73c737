"""How much disk a job's machine needs, checked before renting (#16: a full disk mid-job).

Why: a cloud machine's disk is what we ask for (RunPod `disk` = containerDiskInGb, Vast `disk`,
AWS's root EBS volume, SkyPilot `disk_size`: all from `LaunchRequest.disk_gb`, 100 GB unless
`resources.disk_gb` says otherwise). An 8B full fine-tune's checkpoint is ~48 GB (bf16 weights +
AdamW states); two of them, the model download and the environment do not fit in 100 GB, and the
job used to find out at its first checkpoint, after paying for the training up to it.

What must fit, on the machine's one disk:
  the environment (the bootstrap's pip installs, HF caches of tokenizer and config): ENV_GIB
  + the model download (hub safetensors, 2 bytes per parameter)
  + 2 local checkpoints (HF writes the new one before it deletes the old; a restore adds its copy
    in place of the old one): weights saved (the adapter, or every weight for a full fine-tune)
    + the optimizer's states (planner/memory.py's per-optimizer rule) + tokenizer/rng/scheduler
  + the final save (the adapter or the weights, plus merged/ with `merge: true`).
The trainer measures the real size when a disk fills anyway (cloudtune/trainer/disk.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cloudtune.planner.types import ModelArch, TrainConfig

GIB = 1024**3
ENV_GIB = 10.0  # torch + CUDA wheels of the bootstrap (~6 GB unpacked), pip cache, HF caches
SMALL_FILES = 64 * 1024**2  # tokenizer.json (Llama 3: 9 MB), rng/scheduler/trainer_state, model card
DEFAULT_DISK_GB = 100  # providers/base.py LaunchRequest.disk_gb


@dataclass(frozen=True)
class DiskNeed:
    download: int
    checkpoint: int
    final: int

    @property
    def total(self) -> int:
        return int(ENV_GIB * GIB) + self.download + 2 * self.checkpoint + self.final

    @property
    def gb(self) -> int:
        """The smallest whole `resources.disk_gb` that holds it (GB as the providers count them: GiB)."""
        return math.ceil(self.total / GIB)

    def line(self) -> str:
        return (f"the model download ({self.download / GIB:.1f} GiB) + 2 checkpoints (2 x "
                f"{self.checkpoint / GIB:.1f} GiB) + the final save ({self.final / GIB:.1f} GiB) + the "
                f"environment ({ENV_GIB:.0f} GiB)")


def disk_need(arch: ModelArch, cfg: TrainConfig, *, merge: bool = False) -> DiskNeed:
    from cloudtune.planner.memory import _optimizer_bytes, lora_params

    params = int(arch.params_b * 1e9)
    download = 2 * params
    if cfg.method == "full":
        pbytes = 2 if cfg.full_precision == "bf16" else 4
        n_train, saved = params, params * pbytes
        final = saved
    else:
        pbytes = 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype)
        n_train = lora_params(arch, cfg.lora_rank, cfg.lora_targets)
        saved = n_train * pbytes
        final = saved + (2 * params if merge else 0)
    try:
        states, _ = _optimizer_bytes(cfg.optimizer, n_train, pbytes, [], [])
    except Exception:  # noqa: BLE001 - an unknown optimizer is refused elsewhere; size it as AdamW here
        states = 2.0 * pbytes * n_train
    return DiskNeed(download=download, checkpoint=int(saved + states) + SMALL_FILES, final=final + SMALL_FILES)


def check_disk(spec, arch: ModelArch | None, cfg: TrainConfig | None, remote: list[str]) -> int | None:
    """Before renting: the disk a cloud machine gets. Returns the disk_gb to ask for (None: the
    default holds it) and raises a one-line UserError when `resources.disk_gb` is set too small."""
    from cloudtune.errors import UserError

    if not remote or arch is None or cfg is None:
        return None
    try:
        need = disk_need(arch, cfg, merge=bool(getattr(spec, "merge", False)))
    except Exception:  # noqa: BLE001 - a shape the estimate cannot size: keep what was asked
        return None
    asked = spec.resources.disk_gb
    if asked is not None:
        if asked < need.gb:
            raise UserError(f"resources.disk_gb {asked} cannot hold {need.line()} on a {remote[0]} machine: "
                            f"set resources.disk_gb >= {need.gb}")
        return None
    return need.gb if need.gb > DEFAULT_DISK_GB else None
