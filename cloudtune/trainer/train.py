"""One attempt of a training job: check data, restore, train, checkpoint, finish or stop cleanly.

Built on HF Trainer's own resume (TRL's SFTTrainer/DPOTrainer are Trainers): a checkpoint folder
holds the adapter or weights, optimizer, scheduler, grad scaler, RNG states (python, numpy, torch,
CUDA) and trainer_state.json (global step, so the data loader skips exactly the consumed batches of
the seedable, per-epoch-reseeded sampler). cloudtune adds what HF lacks: the store as the source
of truth (commit protocol in checkpoint.py), time-based checkpoints, preemption and controller
requests (monitor.py), heartbeats, final artifacts and terminal markers.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudtune.errors import UserError
from cloudtune.spec import JobSpec
from cloudtune.store import layout
from cloudtune.store.base import Store
from cloudtune.store.retry import StoreUnavailable
from cloudtune.trainer import contract, disk, trackers
from cloudtune.trainer.checkpoint import CheckpointStore
from cloudtune.trainer.distributed import Dist, PeerLost
from cloudtune.trainer.monitor import (
    Monitor,
    StopRequest,
    imds_endpoint,
    install_signal_handlers,
    peak_memory,
    restore_signal_handlers,
)

log = logging.getLogger("cloudtune.trainer")

# qkv_proj: Phi-3's fused query/key/value projection
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "query_key_value", "c_attn", "Wqkv",
                     "out_proj")


@dataclass
class Attempt:
    spec: JobSpec
    job_id: str
    attempt: int
    store: Store
    work_dir: Path


# ---------------------------------------------------------------------------- model building


def resolve_model(ref: str) -> str:
    """A local folder for `tiny:<task>` refs and paths; hub ids pass through (from_pretrained fetches)."""
    from cloudtune import tiny

    if tiny.is_tiny_ref(ref):
        return str(tiny.ensure_tiny_model(ref))
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model folder {ref!r} has no config.json; point model at a saved Hugging Face model")
        return str(p)
    return ref


def precision(spec: JobSpec) -> str:
    """The compute precision: auto → bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    want = spec.training.precision
    cuda = torch.cuda.is_available()
    if want == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if want == "fp16" and not cuda:
        raise UserError("training.precision fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    return want


def _dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def full_weight_dtype(spec: JobSpec, prec: str) -> Any:
    """The dtype a full fine-tune trains its weights in. training.full_precision "bf16" (the default)
    trains pure bf16 weights (AdamW's states follow the param dtype: ~8 B/param, what Axolotl,
    torchtune and litgpt do) when the compute precision is bf16; "mixed", or fp16/fp32 compute, keeps
    fp32 master weights under autocast (~18 B/param). The planner models the same rule
    (planner/memory.py, full_weight_bytes)."""
    import torch

    if spec.training.full_precision == "bf16" and prec == "bf16":
        return torch.bfloat16
    if spec.training.full_precision == "bf16" and prec == "fp16":
        log.info("full_precision bf16 needs bf16 compute; this GPU has fp16 only: fp32 master weights (mixed)")
    return torch.float32


def load_model(spec: JobSpec, path: str, prec: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cloudtune.trainer import families

    kwargs: dict[str, Any] = {"attn_implementation": families.attention(spec, families.local_config(path))}
    if spec.method == "qlora":
        compute = torch.bfloat16 if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else torch.float32
        if spec.quant_bits == 8:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_storage=compute,
            )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    elif spec.method == "full":
        kwargs["dtype"] = full_weight_dtype(spec, prec)
    else:
        # LoRA holds the frozen base in 16-bit to halve its memory.
        kwargs["dtype"] = _dtype(prec) if prec != "fp32" else torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        if disk.is_disk_full(err):  # the download filled the disk: not bad input (exit 73, not 2)
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {spec.model!r}: {first}") from None


def lora_targets(model: Any, targets: str | list[str]) -> str | list[str]:
    """PEFT target_modules for 'all-linear', 'attention' or an explicit list (checked against the model)."""
    if targets == "all-linear":
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if targets == "attention":
        found = [m for m in ATTENTION_MODULES if m in names]
        if not found:
            raise UserError("lora.targets 'attention' found no attention projections in this model; list module names")
        return found
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.endswith("Linear")})
        raise UserError(f"lora.targets {missing} match no module of {model.config.model_type}; available: {', '.join(linear)}")
    return list(targets)


def wrap_peft(spec: JobSpec, model: Any, base_adapter: str | None) -> Any:
    """Add a trainable LoRA adapter (or continue a given SFT adapter, for DPO)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing
        )
    if base_adapter:
        return PeftModel.from_pretrained(model, base_adapter, is_trainable=True)
    if spec.method == "full":
        return model
    from cloudtune.trainer.families import moe_lora

    # MoE: fused experts as target_parameters, no router adapter, dropout 0 (families.py)
    targets = moe_lora(model, spec.lora.targets, spec.lora.dropout) or {
        "target_modules": lora_targets(model, spec.lora.targets), "lora_dropout": spec.lora.dropout}
    config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        **targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


def fetch_adapter(ref: str, store: Store, work_dir: Path) -> str:
    """A local folder for dpo.base_adapter: a path, a store URL (file://, s3://) or a job id in this store."""
    from cloudtune.store import open_store

    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"dpo.base_adapter {ref!r} has no adapter_config.json; point it at a final/ folder")
        return str(p)
    if "://" in ref:
        src, prefix = open_store(ref.rstrip("/")), ""
    elif store.exists(f"{ref}/final/adapter_config.json"):
        src, prefix = store, f"{ref}/final/"
    else:
        raise UserError(f"dpo.base_adapter {ref!r} is not a folder, store URL or job id with a final adapter")
    dest = work_dir / "base_adapter"
    keys = src.list(prefix)
    if not any(k.endswith("adapter_config.json") for k in keys):
        raise UserError(f"dpo.base_adapter {ref!r} holds no adapter_config.json")
    for key in keys:
        rel = key[len(prefix):]
        if "/" not in rel:  # the adapter files, not merged/ or other folders
            src.download_file(key, dest / rel)
    return str(dest)


# ------------------------------------------------------------------------------ the callback


def make_callback(att: Attempt, monitor: Monitor, ckpts: CheckpointStore, req: StopRequest,
                  dist: Dist | None = None) -> Any:
    from transformers import TrainerCallback

    every_s = (att.spec.checkpoint.every_minutes or 0) * 60
    dist = dist or Dist()

    class CloudtuneCallback(TrainerCallback):
        """Turns stop/checkpoint requests into saves at step boundaries and commits saves to the store."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.last_save = time.monotonic()
            self.start_step = 0
            self.start_tokens = 0
            self.committed_step: int | None = None
            self.last_loss: float | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = self.last_save = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = int(state.num_input_tokens_seen or 0)
            monitor.beat(phase="training", step=state.global_step, total_steps=state.max_steps)
            return control

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            elapsed = time.monotonic() - self.t0
            done = state.global_step - self.start_step
            tokens = int(state.num_input_tokens_seen or 0) - self.start_tokens
            mem, kind = peak_memory()
            eta = elapsed / done * (state.max_steps - state.global_step) if done else None
            monitor.update(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch,
                           tokens_per_s=round(tokens / elapsed, 2) if elapsed > 0 else None,
                           peak_mem_bytes=mem, peak_mem_kind=kind, eta_s=round(eta, 1) if eta else eta,
                           last_step_time=time.time())
            # All ranks agree (one all-reduce) so a request seen by one rank saves/stops every rank here.
            due = bool(every_s) and time.monotonic() - self.last_save >= every_s
            agreed = dist.agree(req.stop, req.reason, req.take_checkpoint_request() or due)
            if agreed.stop:
                req.request_stop(agreed.reason, "another rank was asked to stop")
                control.should_save = True
                control.should_training_stop = True
            elif agreed.checkpoint:
                control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            logs = logs or {}
            fields = {}
            if "loss" in logs:
                fields["loss"] = self.last_loss = float(logs["loss"])
            if "learning_rate" in logs:
                fields["learning_rate"] = float(logs["learning_rate"])
            if "eval_loss" in logs:
                fields["eval_loss"] = float(logs["eval_loss"])
            if fields:
                monitor.update(**fields)
            return control

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            monitor.beat(phase="checkpointing", step=step)
            dist.barrier()  # every rank's files (rng_state_<rank>.pth, shards) are on disk
            if dist.is_main:  # rank 0 alone commits: files, then MANIFEST, then LATEST
                t = time.monotonic()
                canonical_adapter_config(local)
                meta = dist.checkpoint_meta(args.per_device_train_batch_size, args.gradient_accumulation_steps)
                manifest = ckpts.commit(local, step, {"attempt": att.attempt, "reason": req.reason or "interval",
                                                      **meta})
                log.info("checkpoint %d committed (%d files, %.1f MB, %.1fs)", step, len(manifest["files"]),
                         manifest["bytes"] / 1e6, time.monotonic() - t)
                trackers.upload_tensorboard(att.store, att.job_id, att.attempt, args.output_dir)
            self.last_save = time.monotonic()
            self.committed_step = step
            monitor.beat(phase="training", last_checkpoint_step=step)
            return control

    return CloudtuneCallback()


# ---------------------------------------------------------------------------------- run


def report_to(wanted: list[str]) -> list[str]:
    """The trackers that are asked for and installed (a missing one is a warning, not a failure)."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
    out = []
    for name in wanted:
        mods = modules.get(name, (name,))
        if any(importlib.util.find_spec(m) for m in mods):
            out.append(name)
        else:
            log.warning("report_to %r requested but not installed; pip install %s", name, mods[0])
    return out


def build_trainer(att: Attempt, model: Any, tokenizer: Any, train_rows: list[dict], eval_rows: list[dict],
                  prec: str, callback: Any) -> Any:
    import torch
    from datasets import Dataset

    spec, t = att.spec, att.spec.training
    common: dict[str, Any] = dict(
        output_dir=str(att.work_dir / "hf"),
        per_device_train_batch_size=t.micro_batch,
        per_device_eval_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if spec.checkpoint.every_steps else "no",
        save_steps=spec.checkpoint.every_steps or 500,
        save_total_limit=1,  # local copies only; the store keeps `checkpoint.keep`
        eval_strategy=("steps" if t.eval_steps else "no") if eval_rows else "no",
        eval_steps=t.eval_steps,
        report_to=report_to(t.report_to) or "none",
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        dataloader_num_workers=0,  # workers would need their own seeding; tokenized data is in memory
        ddp_find_unused_parameters=False,  # LoRA and full FT use every trainable parameter each step
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        max_length=spec.data.max_seq_len,
    )
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    if spec.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=spec.dpo.beta, **common)
        return DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=[callback])
    from trl import SFTConfig, SFTTrainer

    packing = spec.data.packing
    args = SFTConfig(
        packing=packing,
        # best-fit packing needs position-aware attention (flash) to keep sequences apart; with sdpa or
        # eager use contiguous "wrapped" packing, the classic approach.
        packing_strategy="bfd" if spec.training.attention == "flash_attention_2" else "wrapped",
        dataset_text_field="text",
        **common,
    )
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=[callback])


def run(att: Attempt) -> int:
    """Run one attempt; returns the exit code (see contract.py). Writes DONE.json on success."""
    from cloudtune.trainer.data import load_for_training

    spec, store, job = att.spec, att.store, att.job_id
    if store.exists(layout.done_key(job)):
        log.info("job %s is already done (DONE.json present); nothing to do", job)
        return contract.EXIT_DONE
    dist = Dist().init()  # world size 1 without a launcher: every call below is a no-op
    if dist.is_main and not store.exists(layout.spec_key(job)):
        store.put_bytes(layout.spec_key(job), spec.to_json().encode())

    req = StopRequest()
    previous_handlers = install_signal_handlers(req)
    monitor = Monitor(store, job, att.attempt, req, imds=imds_endpoint() if dist.is_local_main else None,
                      main=dist.is_main).start()
    started = time.time()
    trainer = ckpts = None
    try:
        monitor.beat(phase="loading")
        # 1. data first: a malformed record must cost nothing
        train_recs, val_recs, fmt = load_for_training(spec)
        log.info("data: %d training records, %d validation, format %s", len(train_recs), len(val_recs), fmt)

        # 2. restore the newest committed checkpoint that verifies
        ckpts = CheckpointStore(store, job, keep=spec.checkpoint.keep)
        if dist.is_local_main:  # earlier attempts' dirs on this disk, once the store holds all they hold
            try:
                disk.clean_old_attempts(att.work_dir, ckpts, att.attempt)
            except Exception as err:  # noqa: BLE001 - a cleanup never fails the job it makes room for
                log.warning("old work dirs not cleaned: %s: %s", type(err).__name__, err)
        restored = dist.restore(ckpts, att.work_dir)
        if restored:
            # written by another world size? same global batch, or a one-line refusal (distributed.py)
            spec.training.grad_accum = dist.resume_batch(ckpts.manifest(restored[0]) or {}, restored[0],
                                                         spec.training.micro_batch, spec.training.grad_accum)
            log.info("resuming from checkpoint %d", restored[0])
            monitor.beat(last_checkpoint_step=restored[0], step=restored[0])

        # 3. model, tokenizer, adapter
        import torch
        from transformers import AutoTokenizer, set_seed

        set_seed(spec.training.seed)
        path = resolve_model(spec.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the tokenizer of {spec.model!r}: {str(err).splitlines()[0]}") from None
        # a load-time option (HF_HUB_OFFLINE sets it) is not part of the tokenizer: saved, it made final/
        # differ between an offline and an online attempt of the same job
        tokenizer.init_kwargs.pop("local_files_only", None)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # rows before the model: a template refusal or all-too-long data costs no model load (exit 2)
        chat = tokenizer.chat_template is not None
        train_rows, eval_rows = training_rows(spec, tokenizer, train_recs, val_recs, fmt, chat)
        prec = precision(spec)
        model = load_model(spec, path, prec)
        base_adapter = fetch_adapter(spec.dpo.base_adapter, store, att.work_dir) if (
            spec.stage == "dpo" and spec.dpo.base_adapter) else None
        if base_adapter and spec.method == "full":
            raise UserError("dpo.base_adapter needs method lora or qlora (a full fine-tune has no adapter)")
        model = wrap_peft(spec, model, base_adapter)

        callback = make_callback(att, monitor, ckpts, req, dist)
        trainer = build_trainer(att, model, tokenizer, train_rows, eval_rows, prec, callback)

        if spec.method == "qlora":
            from cloudtune.trainer.families import keep_adapter_dtype_on_resume

            keep_adapter_dtype_on_resume(trainer.model)  # resume keeps TRL's bf16 adapter: bitwise
        # 4. train (HF skips the consumed batches and restores optimizer/scheduler/scaler/RNG)
        result = trainer.train(resume_from_checkpoint=str(restored[1]) if restored else None)
        from cloudtune.trainer.families import quantized_share, stop_router_logits

        stop_router_logits(trainer.model)  # TRL's aux-loss switch: not in final/config.json, not in generate

        if req.stop:
            code = contract.EXIT_STOPPED if req.reason == "control" else contract.EXIT_PREEMPTED
            phase = "stopped" if code == contract.EXIT_STOPPED else "preempted"
            monitor.beat(phase=phase, stop_reason=req.reason, stop_detail=req.detail)
            log.warning("%s at step %d after committing checkpoint %s", phase, trainer.state.global_step,
                        callback.committed_step)
            return code

        # 5. final artifacts
        monitor.beat(phase="saving", step=trainer.state.global_step)
        eval_loss = None
        if eval_rows:
            eval_loss = float(trainer.evaluate().get("eval_loss", float("nan")))
        final_dir = att.work_dir / "final"
        trainer.save_model(str(final_dir))
        # HF's pickled TrainingArguments hold this attempt's paths (so they differ between an
        # interrupted and an uninterrupted run) and a pickle is no artifact to hand out: the spec is
        # in the store. What stays is the adapter/weights, tokenizer, model card and summary.
        if not dist.is_main:  # rank 0 alone writes final/ and DONE.json
            return contract.EXIT_DONE
        (final_dir / "training_args.bin").unlink(missing_ok=True)
        # DPO on a PEFT model: TRL trains against a frozen copy of the starting adapter named "ref", and
        # save_model writes it to final/ref/ (its adapter_config.json in hash-seed order). It is the
        # SFT adapter the job started from, not a result: keep only the trained adapter.
        if spec.stage == "dpo":
            shutil.rmtree(final_dir / "ref", ignore_errors=True)
        canonical_adapter_config(final_dir)
        tokenizer.save_pretrained(str(final_dir))
        if spec.merge:
            if spec.method == "full":
                log.info("merge: true has no effect for a full fine-tune (the weights are already whole)")
            else:
                merge_adapter(path, final_dir, final_dir / "merged", tokenizer)
        # 6. did it learn? Only now, with every final byte written: evaluation cannot touch them.
        generation = evaluate_final(spec, trainer, tokenizer, train_recs, val_recs, fmt, chat, monitor)
        mem, kind = peak_memory()
        wall = time.time() - started
        tokens = int(trainer.state.num_input_tokens_seen or 0) - callback.start_tokens
        train_s = float(result.metrics.get("train_runtime") or wall)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        summary = {
            "job_id": job,
            "attempt": att.attempt,
            "method": spec.method,
            "stage": spec.stage,
            "model": spec.model,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "train_loss": result.training_loss,
            "eval_loss": eval_loss,
            "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
            "tokens_per_s": round(tokens / train_s, 2) if train_s > 0 else None,
            "peak_mem_bytes": mem,
            "peak_mem_kind": kind,
            "precision": prec,
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "quantized_weight_share": quantized_share(trainer.model),
            "quantized_linears": sum(1 for m in trainer.model.modules()  # bnb layers, not PEFT wrappers
                                     if type(m).__module__.startswith("bitsandbytes")
                                     and type(m).__name__ in ("Linear4bit", "Linear8bitLt")),
            "wall_s": round(wall, 2),
            "train_s": round(train_s, 2),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "generation_eval": generation,
        }
        (final_dir / "summary.json").write_text(__import__("json").dumps(summary, indent=2, sort_keys=True))
        trackers.upload_tensorboard(store, job, att.attempt, trainer.args.output_dir)  # the writer is closed now
        upload_final(store, job, final_dir)
        store.put_json(layout.done_key(job), {"time": time.time(), "attempt": att.attempt,
                                              "steps": summary["steps"], "final": layout.final_prefix(job)})
        monitor.beat(phase="done", step=trainer.state.global_step, loss=summary["final_loss"])
        log.info("done: %d steps, final loss %s, %.1fs", summary["steps"], summary["final_loss"], wall)
        return contract.EXIT_DONE
    except Exception as err:
        if dist.peer_lost(err):  # a vanished peer is a relaunch (exit 77), not FAILED.json
            raise PeerLost(f"rank {dist.rank}: another process of the job is gone ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
        if (disk.store_error_is_local(err, att.work_dir, store) if isinstance(err, StoreUnavailable)
                else disk.is_disk_full(err, att.work_dir)):
            # this machine's disk, not the store: drop the partial save, say how big, exit 73 (cli.py)
            step = trainer.state.global_step if trainer is not None else int(monitor.fields.get("step") or 0)
            full = disk.on_disk_full(err, att.work_dir, step=step, phase=str(monitor.fields.get("phase")),
                                     trainer=trainer, ckpts=ckpts)
            monitor.beat(**full.heartbeat())
            raise full from err
        raise
    finally:
        monitor.close()
        restore_signal_handlers(previous_handlers)
        dist.close()


def training_rows(spec: JobSpec, tokenizer: Any, train_recs: list, val_recs: list, fmt: str,
                  chat: bool) -> tuple[list[dict], list[dict]]:
    """Dataset rows for TRL. SFT chat data is tokenized here (chat.py): labels on assistant turns
    and end-of-turn only, TRL uses the given labels as they are; rows too long are counted and
    all-too-long data is refused (DataError: exit 2, before the model loads). Other data goes to TRL
    as text or prompt/completion (TRL masks the prompt) or preference rows."""
    from cloudtune.trainer.chat import encode_records
    from cloudtune.trainer.data import to_trl_rows

    if chat and spec.stage == "sft" and fmt != "text":
        out = []
        for recs in (train_recs, val_recs):
            enc = encode_records(tokenizer, recs, fmt, spec.data.max_seq_len, model=spec.model)
            for note in enc.notes(spec.data.max_seq_len, recs[0].where.rsplit(":", 1)[0] if recs else ""):
                log.warning("%s", note)
            out.append(enc.rows)
        return out[0], out[1]
    if chat and spec.stage == "dpo":  # a pair the template refuses: exit 2 before the model loads
        from cloudtune.trainer.chat import check_preference

        for recs in (train_recs, val_recs):
            for note in check_preference(tokenizer, recs, spec.data.max_seq_len, model=spec.model) if recs else []:
                log.warning("%s", note)
    return (to_trl_rows(train_recs, fmt, chat=chat, text_field=spec.data.text_field),
            to_trl_rows(val_recs, fmt, chat=chat, text_field=spec.data.text_field))


def canonical_adapter_config(folder: Path) -> None:
    """Sort adapter_config.json's target_modules: PEFT writes that list from a set, in an order that
    follows the process's hash seed, so an interrupted and an uninterrupted run would differ there."""
    import json

    cfg_path = Path(folder) / "adapter_config.json"
    if not cfg_path.is_file():
        return
    raw = cfg_path.read_text()
    cfg = json.loads(raw)
    if isinstance(cfg.get("target_modules"), list) or isinstance(cfg.get("target_parameters"), list):
        for key in ("target_modules", "target_parameters"):  # MoE adapters list expert tensors too
            if isinstance(cfg.get(key), list):
                cfg[key] = sorted(cfg[key])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def evaluate_final(spec: JobSpec, trainer: Any, tokenizer: Any, train_recs: list, val_recs: list, fmt: str,
                   chat: bool, monitor: Monitor) -> dict[str, Any] | None:
    """Greedy generation on held-out prompts, before and after the adapter; None when there are none."""
    from cloudtune.trainer.evaluate import generation_eval, heldout_cases

    cases, source = heldout_cases(spec.model, train_recs, val_recs, fmt, chat)
    if not cases:
        return None
    monitor.beat(phase="evaluating")
    t = time.monotonic()
    model = trainer.accelerator.unwrap_model(trainer.model)
    try:
        result = generation_eval(model, tokenizer, cases, source, chat)
    except Exception as err:  # noqa: BLE001 - a failed demo evaluation must not fail a finished training
        log.warning("held-out generation failed (%s: %s); the summary has no generation_eval", type(err).__name__, err)
        return None
    result["eval_s"] = round(time.monotonic() - t, 2)
    before = result["before"]["exact_match"] if result["before"] else None
    log.info("held-out exact match: before %s, after %s (%d examples, %.1fs)", before,
             result["after"]["exact_match"], result["examples"], result["eval_s"])
    return result


def merge_adapter(base_path: str, adapter_dir: Path, dest: Path, tokenizer: Any) -> None:
    """Merge the adapter into 16-bit base weights (bf16 where supported, else fp16), for serving."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else torch.float16
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def upload_final(store: Store, job: str, final_dir: Path) -> None:
    """Upload final/ with summary.json last, so a reader that sees the summary sees everything."""
    prefix = layout.final_prefix(job)
    files = sorted(p for p in final_dir.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda f: f.name == "summary.json"):
        store.upload_file(p, prefix + p.relative_to(final_dir).as_posix())
