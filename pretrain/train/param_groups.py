"""Optimiser parameter groups: layer-wise lr decay, patch-embed lr multiplier, no decay on norms.

Each group carries `lr_multiplier`, `wd_multiplier` and `is_last_layer`; the trainer sets the
group's lr/wd from the schedules times these multipliers every iteration.
"""

from __future__ import annotations

import re

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens", "storage_tokens")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings/tokens, i+1 for block i, n_blocks+1 for the final norm and the heads."""
    if name.startswith("backbone."):
        name_in = name[len("backbone.") :]
        if name_in.startswith(_EMBED):
            return 0
        m = _BLOCK.search("." + name_in)
        if m:
            return int(m.group(1)) + 1
    return n_blocks + 1


def param_groups(
    model: nn.Module, n_blocks: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """Groups of `model`'s trainable parameters sharing (lr mult, wd mult, is_last_layer)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if ".patch_embed." in "." + name:
            lr_mult *= patch_embed_lr_mult
        # As DINOv2: biases, norms and LayerScale gammas are not decayed (tokens are, and so is
        # the prototypes' K x 1 gain `last_layer.weight_g`, which dinov2 decays like any weight).
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
        wd_mult = 0.0 if no_decay else 1.0
        last = "last_layer" in name
        key = (lr_mult, wd_mult, last)
        g = groups.setdefault(
            key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": last}
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups, key=str)]


def optimizer_state_before(saved: dict, optimizer, model: nn.Module, added: set[str]) -> dict:
    """An optimiser state saved before the parameters named `added` existed, laid out for
    `optimizer` (built by `param_groups(model, ...)`); the added parameters start without state.

    Without `added`, `param_groups` gives the saved run's groups and order, so the old indices
    pair with the remaining new ones group by group (groups matched on their multipliers).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    key = lambda g: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])  # noqa: E731
    current = optimizer.state_dict()
    old_groups = {key(g): g for g in saved["param_groups"]}
    state, groups = {}, []
    for live, group in zip(optimizer.param_groups, current["param_groups"]):
        kept = [i for p, i in zip(live["params"], group["params"]) if names[id(p)] not in added]
        old = old_groups.pop(key(group), None)
        if old is None:
            if kept:
                raise ValueError(f"the saved optimiser state has no group {key(group)}")
            groups.append(group)
            continue
        if len(old["params"]) != len(kept):
            raise ValueError(
                f"the saved optimiser group {key(group)} holds {len(old['params'])} parameters, not {len(kept)}"
            )
        state.update({new: saved["state"][i] for i, new in zip(old["params"], kept) if i in saved["state"]})
        groups.append({**old, "params": group["params"]})
    if old_groups:
        raise ValueError(f"the saved optimiser state has groups {sorted(old_groups)} this model lacks")
    return {"state": state, "param_groups": groups}
