"""DINOv2 self-supervised pretraining: heads, losses, masking, multi-crop, data stream, trainer."""

from lvd.pretrain.train.checkpoint import export_teacher, load_checkpoint
from lvd.pretrain.train.trainer import run_pretrain

__all__ = ["export_teacher", "load_checkpoint", "run_pretrain"]
