"""`run_pretrain(cfg) -> Path`: the DINOv2 training loop on WebDataset shards.

One process or one process per rank under torchrun (DDP, or FSDP for large models). Every
iteration reseeds torch from (seed, rank, iteration), the data stream position travels in the
checkpoint and schedules are indexed by iteration, so a killed run resumed from its last
checkpoint repeats the uninterrupted run's numbers (on CPU; GPU kernels may differ in the
last bits). Writes RUN/pretrain/{config.yaml, metrics.jsonl, checkpoints/, teacher_backbone.pth,
_SUCCESS.json}.

Three models take part. The student learns; the EMA model follows it (`ema`, exported); the
teacher gives the targets. In self-distillation (modes dino, dinov2) the teacher *is* the EMA
model; in `mode: distill` it is a frozen, larger model from a file and the EMA model is a spare
average of the student. With Gram anchoring a fourth, frozen copy of the EMA backbone gives the
Gram targets. Training runs in phases (`phases`), each with its own crops and schedules.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_path, atomic_write_json
from lvd.common.config import ConfigError
from lvd.common.devices import autocast, resolve_device, resolve_dtype
from lvd.pretrain.train import distributed as D
from lvd.pretrain.train.augment import MultiCrop
from lvd.pretrain.train.checkpoint import (
    FORMAT,
    atomic_save,
    checkpoint_path,
    export_backbone,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
)
from lvd.pretrain.train.config import effective_loss_settings
from lvd.pretrain.train.gram import GramTeacher
from lvd.pretrain.train.masking import batch_masks
from lvd.pretrain.train.metrics import MetricsLog
from lvd.pretrain.train.param_groups import optimizer_state_before, param_groups
from lvd.pretrain.train.phases import Phase, phase_at, plan_phases
from lvd.pretrain.train.schedules import build_schedules
from lvd.pretrain.train.ssl import MaskInfo, SSLModel, SSLObjective, copy_parameters, ema_update
from lvd.pretrain.train.stream import ShardStream, expand_shards

log = logging.getLogger(__name__)
N_GLOBAL = 2


def autocast_dtype(name: str, device: torch.device, step=None, shape: dict | None = None) -> torch.dtype | None:
    """The autocast dtype of the forward passes; None = full float32.

    lvd's one `auto` rule (`lvd.common.devices.resolve_dtype`), timed on `step(dtype)` (one forward
    and backward of the student on a small batch) where the CPU has native bf16. Losses, centering
    and the EMA stay in float32 either way.
    """
    dtype = resolve_dtype(name, device, measure=step, task="training step", shape=shape)
    return None if dtype == torch.float32 else dtype


def step_seed(seed: int, rank: int, iteration: int) -> int:
    """A 63-bit seed that depends on (seed, rank, iteration) alone: resume needs no RNG state."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, np.uint64)[0] >> 1)


def backbone_overrides(cfg: DictConfig, settings: dict) -> dict:
    """`model.overrides`, plus a mask token where masked-patch training needs one its family lacks."""
    from lvd.pretrain.models.registry import get_spec

    overrides = dict(OmegaConf.to_container(cfg.model.overrides, resolve=True))
    spec = get_spec(cfg.model.arch)
    if settings["ibot"] and spec.kind == "vit" and not {**spec.arch, **overrides}.get("mask_token", True):
        overrides["mask_token"] = True  # DINO v1 ViTs have none: it starts at zero, as it would from scratch
    return overrides


def _student_drop_path(cfg: DictConfig) -> dict:
    """Drop-path settings for a backbone that has them (DINO's ResNet-50 has none)."""
    from lvd.pretrain.models.registry import get_spec

    spec = get_spec(cfg.model.arch)
    wanted = {"drop_path_rate": cfg.model.drop_path_rate, "drop_path_uniform": bool(cfg.model.drop_path_uniform)}
    return {k: v for k, v in wanted.items() if spec.accepts(k)}


def build_models(cfg: DictConfig, settings: dict, device: torch.device) -> tuple[SSLModel, SSLModel]:
    """Student (with drop-path) and its EMA model (without), starting from identical weights.

    A BatchNorm backbone (ResNet) keeps its teacher in training mode, as DINO does: the teacher
    normalises with the statistics of its own batch, and its running statistics follow its
    forward passes (the EMA moves parameters only). Under torchrun on GPUs both use synchronised
    BatchNorm. `model.freeze_backbone` leaves the student's backbone untrained (heads only).
    """
    from lvd.pretrain.models import build_backbone

    overrides = backbone_overrides(cfg, settings)
    drop_path = _student_drop_path(cfg)

    def heads(h):
        return dict(
            out_dim=h.prototypes,
            hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim,
            nlayers=h.nlayers,
            norm_last_layer=bool(h.norm_last_layer),
        )

    ibot = heads(cfg.ibot_head) if settings["ibot"] else None
    torch.manual_seed(cfg.seed)
    student = SSLModel(
        build_backbone(cfg.model.arch, weights=cfg.model.weights, **drop_path, **overrides),
        heads(cfg.dino_head),
        ibot,
    )
    no_drop = {"drop_path_rate": 0.0} if drop_path else {}
    teacher = SSLModel(build_backbone(cfg.model.arch, weights=None, **no_drop, **overrides), heads(cfg.dino_head), ibot)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if cfg.model.freeze_backbone:
        student.backbone.requires_grad_(False)
    mask_token = getattr(student.backbone, "mask_token", None)
    if settings["distill"] and isinstance(mask_token, nn.Parameter):
        mask_token.requires_grad_(False)  # a distilled student is never masked: nothing to learn there
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if batchnorm and D.is_distributed() and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    return student.to(device).train(), teacher.to(device).train(batchnorm)


def build_optimizer(cfg: DictConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """`optim.optimizer`: AdamW (DINOv2, DINO's ViTs) or SGD with momentum (DINO's ResNet-50).

    The learning rate and weight decay of every group are set from the schedules each iteration.
    """
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=float(cfg.optim.sgd_momentum))
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.adamw_betas))


def forward_losses(
    student: nn.Module,
    teacher: nn.Module,
    objective: SSLObjective,
    global_crops: torch.Tensor,
    local_crops: torch.Tensor | None,
    mask: MaskInfo | None,
    teacher_temp: float,
    amp: torch.dtype | None,
    *,
    mask_student: bool = True,
    gram: tuple[GramTeacher, torch.Tensor, tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher targets (no grad) + student forward + the weighted losses, for one batch.

    `mask_student` false (distillation) shows the student its global crops whole while the iBOT
    term still compares the patches `mask` picks. `gram` = (Gram teacher, its input crops, the
    student's patch grid) adds the Gram anchoring term.
    """
    ctx = torch.autocast(global_crops.device.type, dtype=amp) if amp is not None else nullcontext()
    indices = mask.indices if mask is not None else None
    with ctx:
        with torch.no_grad():
            t_out = teacher(global_crops, None, None, indices)
            gram_targets = gram[0].targets(gram[1], gram[2]) if gram is not None else None
        s_out = student(global_crops, local_crops, mask.masks if mask is not None and mask_student else None, indices)
    return objective(s_out, t_out, N_GLOBAL, teacher_temp, mask, gram_targets)


class Pretrainer:
    """Holds the models, optimiser, schedules and stream of one training run."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.run_dir) / "pretrain"
        self.device = resolve_device(cfg.train.device)
        D.init_from_env(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.phases = plan_phases(cfg)
        self.total = self.phases[-1].stop
        self.settings = effective_loss_settings(cfg)
        self.student, self.ema = build_models(cfg, self.settings, self.device)
        self.teacher = self.ema  # self-distillation: the EMA model gives the targets
        if self.settings["distill"]:
            from lvd.pretrain.train.distill import build_distill_teacher

            self.teacher = build_distill_teacher(cfg, self.settings, self.student, self.device)
        self.gram = self._gram_teacher()
        self.amp = self._autocast_dtype()
        self.n_blocks = int(
            getattr(self.student.backbone, "n_blocks", len(getattr(self.student.backbone, "blocks", [])))
        )
        self.patch = int(self.student.backbone.patch_size)
        self._check_crop_sizes()
        self.objective = SSLObjective(
            cfg.dino_head.prototypes,
            cfg.ibot_head.prototypes if self.settings["ibot"] else None,
            centering=self.settings["centering"],
            center_momentum=cfg.loss.center_momentum,
            sinkhorn_iters=cfg.loss.sinkhorn_iters,
            student_temp=cfg.loss.student_temp,
            dino_weight=self.settings["dino_weight"],
            ibot_weight=self.settings["ibot_weight"],
            koleo_weight=self.settings["koleo_weight"],
        ).to(self.device)
        self.train_module = self._wrap()
        self.optimizer = self._new_optimizer()
        self.n_streams = max(1, int(cfg.data.num_workers))
        self.start, self.positions = 0, [(0, 0)] * self.n_streams
        self._set_phase(self.phases[0])

    # -- set-up ------------------------------------------------------------------------
    def _gram_teacher(self) -> GramTeacher | None:
        """A frozen backbone of the student's architecture, where some phase uses Gram anchoring."""
        if not any(p.cfg.loss.gram_weight > 0 for p in self.phases):
            return None
        from lvd.pretrain.models import build_backbone

        no_drop = {"drop_path_rate": 0.0} if _student_drop_path(self.cfg) else {}
        backbone = build_backbone(
            self.cfg.model.arch, weights=None, **no_drop, **backbone_overrides(self.cfg, self.settings)
        )
        return GramTeacher(backbone.to(self.device))

    def _check_crop_sizes(self) -> None:
        if not hasattr(self.student.backbone, "blocks"):  # a ConvNet takes any size
            return
        for phase in self.phases:
            for size in (phase.cfg.crops.global_size, phase.cfg.crops.local_size):
                if size % self.patch:
                    raise ConfigError(
                        f"phase {phase.name}: crop size {size} is not a multiple of the patch size {self.patch}"
                    )

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = param_groups(self.student, self.n_blocks, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        return build_optimizer(cfg, groups)

    def _set_phase(self, phase: Phase) -> None:
        """Crops, mask grid, schedules and loss weights of `phase` (the models are left as they are)."""
        self.phase = phase
        pc = phase.cfg
        self.global_batch = pc.data.batch_size_per_rank * self.world
        self.schedules = build_schedules(pc.optim, phase.iterations, pc.optim.iters_per_epoch, self.global_batch)
        gram_res = self.gram is not None and pc.loss.gram_weight > 0 and int(pc.gram.teacher_resolution) > 1
        self.multicrop = MultiCrop(
            pc.crops.global_size,
            pc.crops.local_size,
            pc.crops.n_local,
            tuple(pc.crops.global_scale),
            tuple(pc.crops.local_scale),
            tuple(pc.crops.mean),
            tuple(pc.crops.std),
            gram_size=int(pc.gram.teacher_resolution) * int(pc.crops.global_size) if gram_res else None,
        ).to(self.device)
        self.grid = (pc.crops.global_size // self.patch,) * 2
        self.objective.weights["gram"] = float(pc.loss.gram_weight)
        self.objective.gram_remove_negative = str(pc.gram.remove_negative)

    def _enter_phase(self, phase: Phase) -> None:
        """Begin `phase` during training: `init: from_ema` restarts the student from the EMA model
        with a fresh optimiser state (DINOv2's high-resolution phase starts from the trained
        weights), `continue` keeps both."""
        if phase.init == "from_ema":
            copy_parameters(self.student, self.ema)
            self.optimizer = self._new_optimizer()
        self._set_phase(phase)
        log.info(
            "phase %s: iterations %d-%d, global crops %d px, local %d px x %d (%s)",
            phase.name,
            phase.start,
            phase.stop - 1,
            phase.cfg.crops.global_size,
            phase.cfg.crops.local_size,
            phase.cfg.crops.n_local,
            phase.init,
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        """`train.dtype`, with `auto` measured on the student itself (every rank takes rank 0's)."""
        cfg = self.cfg
        size, batch = int(cfg.crops.global_size), int(cfg.data.batch_size_per_rank)
        backbone = self.student.backbone

        def step(dtype):
            with torch.random.fork_rng(devices=[]):
                crops = torch.randn(min(batch, 8), 3, size, size, device=self.device)
                with autocast(self.device, dtype):
                    out = backbone(crops)
                out = out["x_norm_clstoken"] if isinstance(out, dict) else out
                if out.requires_grad:  # a frozen backbone (model.freeze_backbone) has nothing to differentiate
                    out.float().square().mean().backward()
            backbone.zero_grad(set_to_none=True)

        shape = {
            "arch": str(cfg.model.arch),
            "overrides": dict(OmegaConf.to_container(cfg.model.overrides)),
            "size": size,
            "batch": min(batch, 8),
        }
        amp = autocast_dtype(cfg.train.dtype, self.device, step if self.rank == 0 else None, shape)
        if self.world > 1 and cfg.train.dtype == "auto":  # only rank 0 measures; every rank takes its choice
            flag = torch.tensor([1.0 if self.rank == 0 and amp is not None else 0.0], device=self.device)
            amp = torch.bfloat16 if float(D.all_reduce_sum(flag)) > 0 else None
        return amp

    def _wrap(self) -> nn.Module:
        if not D.is_distributed():
            return self.student
        if self.cfg.train.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            models = [self.student, self.ema]
            if self.teacher is not self.ema:
                models.append(self.teacher)
            if self.gram is not None:
                models.append(self.gram)
            for model in models:
                for block in getattr(getattr(model, "backbone", model), "blocks", []):
                    fully_shard(block)
                fully_shard(model)
            return self.student
        if self.cfg.train.parallel != "ddp":
            raise ValueError(f"train.parallel must be ddp or fsdp, not {self.cfg.train.parallel!r}")
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DINO v1 mode never uses the backbone's mask token.
        return DistributedDataParallel(self.student, device_ids=ids, find_unused_parameters=not self.settings["ibot"])

    def _fsdp(self) -> bool:
        return D.is_distributed() and self.cfg.train.parallel == "fsdp"

    def _loader(self, iteration: int) -> DataLoader:
        """The stream from the saved positions, decoded at the current phase's size."""
        cfg, pc = self.cfg, self.phase.cfg
        shards = expand_shards(
            cfg.data.shards if cfg.data.shards is not None else str(Path(cfg.run_dir) / "shards" / "*.tar")
        )
        stream = ShardStream(
            shards,
            pc.data.image_size,
            pc.data.batch_size_per_rank,
            seed=cfg.seed,
            rank=self.rank,
            num_streams=self.n_streams,
            positions=self.positions,
            batches_consumed=iteration,
            shards_per_cycle=cfg.data.shards_per_cycle,
            shuffle_buffer=cfg.data.shuffle_buffer,
            max_pixels=cfg.data.max_pixels,
        )
        workers = int(cfg.data.num_workers)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_single_thread if workers else None,
            prefetch_factor=2 if workers else None,
        )

    # -- checkpoints -------------------------------------------------------------------
    def _model_state(self, model: nn.Module) -> dict:
        """A full state dict (gathered on every rank under FSDP: a collective)."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return model.state_dict()

    def _load_model_state(self, model: nn.Module, state: dict) -> None:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)

    def _optimizer_state(self) -> dict:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.student, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def save(self, next_iteration: int) -> None:
        pos = torch.tensor(self.positions, dtype=torch.int64)
        all_pos = [torch.zeros_like(pos) for _ in range(self.world)]
        if D.is_distributed():
            torch.distributed.all_gather(all_pos, pos)
        else:
            all_pos = [pos]
        student, ema, optim = self._model_state(self.student), self._model_state(self.ema), self._optimizer_state()
        gram = None
        if self.gram is not None and self.gram.taken_at is not None:
            state = self._model_state(self.gram)  # hub layout, as teacher_backbone
            gram = {"backbone": {k[len("backbone.") :]: v for k, v in state.items()}, "taken_at": self.gram.taken_at}
        if self.rank == 0:
            # the registry name fixes the family; the export (teacher_backbone.safetensors) records it too
            overrides = backbone_overrides(self.cfg, self.settings)
            ckpt = {
                "format": FORMAT,
                "arch": {"name": self.cfg.model.arch, "overrides": overrides},
                # the EMA model's backbone: the teacher in self-distillation, the student's EMA in distillation
                "teacher_backbone": {k[len("backbone.") :]: v for k, v in ema.items() if k.startswith("backbone.")},
                "student": student,
                "teacher": ema,
                "optimizer": optim,
                "objective": self.objective.state_dict(),
                "iteration": next_iteration,
                "phase": self.phase.index,
                "resolution": self.phase.global_size,
                "gram": gram,
                "data": {
                    "positions": [p.tolist() for p in all_pos],
                    "num_streams": self.n_streams,
                    "world_size": self.world,
                },
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            }
            atomic_save(ckpt, checkpoint_path(self.out / "checkpoints", next_iteration))
            prune_checkpoints(self.out / "checkpoints", self.cfg.train.keep_checkpoints)
        D.barrier()

    def resume(self) -> None:
        found = list_checkpoints(self.out / "checkpoints")
        if not found:
            return
        it, path = found[-1]
        ckpt = load_checkpoint(path, map_location=self.device)
        data = ckpt["data"]
        if data["world_size"] != self.world or data["num_streams"] != self.n_streams:
            raise ConfigError(
                f"{path} was written by {data['world_size']} ranks x {data['num_streams']} streams; "
                f"this run has {self.world} x {self.n_streams}: keep them unchanged to resume"
            )
        phase = int(ckpt.get("phase", 0))
        if phase >= len(self.phases):
            raise ConfigError(f"{path} was written in phase {phase}, which this config's phases no longer have")
        self._set_phase(self.phases[phase])  # the state below belongs to this phase's set-up
        self._load_states(ckpt)
        if ckpt.get("gram") is not None and self.gram is not None:
            self._load_model_state(self.gram, {f"backbone.{k}": v for k, v in ckpt["gram"]["backbone"].items()})
            self.gram.taken_at = int(ckpt["gram"]["taken_at"])
        self.objective.load_state_dict(ckpt["objective"])
        self.start = int(ckpt["iteration"])
        self.positions = [tuple(p) for p in data["positions"][self.rank]]
        log.info("resumed from %s at iteration %d (phase %s)", path, self.start, self.phase.name)

    def _load_states(self, ckpt: dict) -> None:
        """Student, EMA model and optimiser state of a checkpoint."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            self._load_model_state(self.student, ckpt["student"])
            self._load_model_state(self.ema, ckpt["teacher"])
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.student, self.optimizer, ckpt["optimizer"], options=opts)
            return
        # A checkpoint from before the prototype gain was a parameter loads with gain 1;
        # its optimiser state then lacks the gain, which starts afresh.
        gains = {
            n
            for n, p in self.student.named_parameters()
            if n.endswith("last_layer.weight_g") and n not in ckpt["student"] and p.requires_grad
        }
        self.student.load_state_dict(ckpt["student"])
        self.ema.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(
            optimizer_state_before(ckpt["optimizer"], self.optimizer, self.student, gains)
            if gains
            else ckpt["optimizer"]
        )

    # -- one iteration -----------------------------------------------------------------
    def _apply_schedules(self, i: int) -> None:
        s = self.schedules
        for g in self.optimizer.param_groups:
            lr = s["last_layer_lr"][i] if g["is_last_layer"] else s["lr"][i]
            g["lr"] = float(lr * g["lr_multiplier"])
            g["weight_decay"] = float(s["wd"][i] * g["wd_multiplier"])

    def _mask(self, it: int, n_images: int) -> MaskInfo | None:
        """The iBOT patches of this iteration: block masks, or every patch (`distill.ibot_patches: all`)."""
        if not self.settings["ibot"]:
            return None
        if self.settings["distill"] and self.cfg.distill.ibot_patches == "all":
            return MaskInfo.from_masks(
                torch.ones(n_images, self.grid[0] * self.grid[1], dtype=torch.bool, device=self.device)
            )
        m = self.phase.cfg.masking
        rng = np.random.default_rng([self.cfg.seed, self.rank, it, 1])
        masks = batch_masks(n_images, self.grid, (m.ratio_min, m.ratio_max), m.sample_probability, rng, m.min_block)
        return MaskInfo.from_masks(masks.to(self.device))

    def _gram_active(self, it: int) -> bool:
        pc = self.phase.cfg
        return self.gram is not None and pc.loss.gram_weight > 0 and it >= pc.gram.start

    def step(self, it: int, images: torch.Tensor) -> dict[str, float]:
        cfg, pc = self.cfg, self.phase.cfg
        torch.manual_seed(step_seed(cfg.seed, self.rank, it))
        gram = self._gram_active(it)
        if gram and self.gram.due(it, pc.gram.start, pc.gram.refresh):
            self.gram.take(self.ema, it)
        crops = self.multicrop(images.to(self.device, non_blocking=True))
        global_crops = torch.cat(crops.global_crops)
        local_crops = torch.cat(crops.local_crops) if crops.local_crops else None
        mask = self._mask(it, global_crops.shape[0])
        gram_inputs = None
        if gram:
            gram_crops = torch.cat(crops.gram_crops) if crops.gram_crops is not None else global_crops
            gram_inputs = (self.gram, gram_crops, self.grid)
        i = it - self.phase.start
        temp = float(self.schedules["teacher_temp"][i])
        losses = forward_losses(
            self.train_module,
            self.teacher,
            self.objective,
            global_crops,
            local_crops,
            mask,
            temp,
            self.amp,
            mask_student=self.settings["mask_student"],
            gram=gram_inputs,
        )
        if not torch.isfinite(losses["total"]):
            raise FloatingPointError(
                f"non-finite loss at iteration {it}: { ({k: float(v) for k, v in losses.items()}) }"
            )
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if pc.optim.clip_grad > 0:
            for part in (self.student.backbone, self.student.dino_head, self.student.ibot_head):
                if part is not None:
                    torch.nn.utils.clip_grad_norm_(part.parameters(), pc.optim.clip_grad)
        self._apply_schedules(i)
        self.optimizer.step()
        ema_update(self.ema, self.student, float(self.schedules["momentum"][i]))
        return {k: v.detach() for k, v in losses.items()}

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        if cfg.train.overwrite and self.rank == 0 and self.out.exists():
            for name in (
                "checkpoints",
                "metrics.jsonl",
                "teacher_backbone.pth",
                "teacher_backbone.safetensors",
                "_SUCCESS.json",
            ):
                p = self.out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        D.barrier()
        if (self.out / "_SUCCESS.json").exists():
            log.info("%s is finished (_SUCCESS.json); train.overwrite=true trains again", self.out)
            return self.out
        self.resume()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.yaml") as tmp:
                OmegaConf.save(cfg, tmp)
        metrics = MetricsLog(self.out / "metrics.jsonl", self.start) if self.rank == 0 else None
        stop = self.total if cfg.train.stop_after is None else min(self.total, int(cfg.train.stop_after))
        show = (sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress)) and self.rank == 0
        bar = tqdm(total=self.total, initial=self.start, disable=not show, desc="pretrain", unit="it")
        batches = None
        t0, last = time.perf_counter(), self.start
        for it in range(self.start, stop):
            phase = phase_at(self.phases, it)
            if phase.index != self.phase.index:
                self._enter_phase(phase)
                batches = None  # the next phase decodes at its own size
            if batches is None:
                batches = iter(self._loader(it))
            batch = next(batches)
            self.positions[batch["stream"]] = tuple(int(x) for x in batch["position"])
            losses = self.step(it, batch["images"])
            if (it + 1) % cfg.train.log_every == 0 or it + 1 == stop:
                now = time.perf_counter()
                self._log(metrics, it, losses, it + 1 - last, now - t0)
                t0, last = now, it + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses['total']):.4f}", refresh=False)
            if (it + 1) % cfg.train.checkpoint_every == 0 or it + 1 == stop:
                self.save(it + 1)
        bar.close()
        if stop < self.total:
            log.info("stopped after iteration %d of %d (train.stop_after); run again to resume", stop, self.total)
            return self.out
        self._finish()
        return self.out

    def _log(self, metrics: MetricsLog | None, it: int, losses: dict, steps: int, elapsed: float) -> None:
        names = sorted(losses)
        vals = torch.stack([losses[k].float() for k in names])
        D.all_reduce_sum(vals)
        vals /= self.world
        if metrics is None:
            return
        i = it - self.phase.start
        row = {
            "iteration": it,
            "phase": self.phase.index,
            **{k: float(v) for k, v in zip(names, vals)},
            "lr": float(self.schedules["lr"][i]),
            "wd": float(self.schedules["wd"][i]),
            "momentum": float(self.schedules["momentum"][i]),
            "teacher_temp": float(self.schedules["teacher_temp"][i]),
            "images_per_s": round(steps * self.global_batch / max(elapsed, 1e-9), 3),
        }
        metrics.write(row)
        log.debug("iteration %d: %s", it, row)

    def _finish(self) -> None:
        found = list_checkpoints(self.out / "checkpoints")
        if self.rank == 0:
            ckpt = load_checkpoint(found[-1][1])
            atomic_save(ckpt["teacher_backbone"], self.out / "teacher_backbone.pth")  # hub layout
            arch = ckpt["arch"]
            resolution = int(ckpt.get("resolution") or self.phases[-1].global_size)
            export_backbone(
                ckpt["teacher_backbone"],
                self.out / "teacher_backbone.safetensors",
                arch["name"],
                arch.get("overrides") or {},
                resolution=resolution,
            )  # self-describing
            info = {
                "iterations": self.total,
                "images_seen": sum(p.iterations * p.cfg.data.batch_size_per_rank * self.world for p in self.phases),
                "arch": ckpt["arch"],
                "mode": str(self.cfg.mode),
                "exported": "the student's EMA" if self.settings["distill"] else "the EMA teacher",
                "resolution": resolution,
                "phases": [
                    {"name": p.name, "iterations": p.iterations, "global_size": p.global_size, "init": p.init}
                    for p in self.phases
                ],
                "checkpoint": str(found[-1][1]),
                "teacher_backbone": str(self.out / "teacher_backbone.pth"),
                "teacher_backbone_self_describing": str(self.out / "teacher_backbone.safetensors"),
                "world_size": self.world,
                "device": str(self.device),
                "versions": {"python": platform.python_version(), "torch": torch.__version__},
            }
            if self.settings["distill"]:
                info["distill_teacher"] = str(self.cfg.distill.teacher)
            atomic_write_json(self.out / "_SUCCESS.json", info)
        D.barrier()


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def run_pretrain(cfg: DictConfig) -> Path:
    """Train (or resume) DINOv2 on the configured shards; returns RUN/pretrain."""
    return Pretrainer(cfg).run()
