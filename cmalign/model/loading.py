"""Loading, freezing and saving open_clip models the way `fit` needs them.

Everything goes through open_clip's own factory, so any name it knows works: a built-in name with
a pretrained tag or a local checkpoint file, ``local-dir:PATH`` and ``hf-hub:ORG/REPO``. The only
additions are cmalign's tiny configs (registered with ``open_clip.add_model_config``) and a
writer for open_clip's ``local-dir:`` layout, so that a fitted model loads anywhere with plain
open_clip.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg

from cmalign.artifacts.atomic import atomic_write
from cmalign.errors import CmalignError, ConfigError, MissingInputError

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODEL = "cmalign-tiny"
_registered = False

TRAINABLE_CHOICES = ("all", "image", "text", "projections")  # plus "last:N"


class ModelLoadError(CmalignError, RuntimeError):
    """open_clip could not build the model or load its weights."""


def register_builtin_configs() -> None:
    """Make cmalign's tiny configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    model_name: str
    model_cfg: dict
    preprocess_cfg: dict


def _model_cfg_for(model_name: str) -> dict:
    if model_name.startswith("local-dir:"):
        path = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        return json.loads(path.read_text())["model_cfg"]
    if model_name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(model_name[len("hf-hub:"):])["model_cfg"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"unknown open_clip model '{model_name}'. Use a built-in name (see `open_clip.list_models()`, "
            f"e.g. ViT-B-32 or {TINY_MODEL}), 'local-dir:PATH' or 'hf-hub:ORG/REPO'."
        )
    return cfg


def load_model(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
               precision: str = "fp32") -> LoadedModel:
    """Create an open_clip model with its transforms and tokenizer.

    ``pretrained`` is an open_clip tag (downloaded by open_clip, so it needs a hub) or a local
    checkpoint file: ``.safetensors`` or a ``torch.save`` state dict, loaded with
    ``weights_only=True``. It is ignored by open_clip for ``local-dir:``/``hf-hub:`` names, so we
    refuse that combination instead of silently dropping it.
    """
    register_builtin_configs()
    if pretrained and (model_name.startswith("local-dir:") or model_name.startswith("hf-hub:")):
        raise ConfigError(f"--pretrained cannot be combined with '{model_name}': that schema carries its own weights")
    if model_name.startswith("local-dir:") and not Path(model_name[len("local-dir:"):]).is_dir():
        raise MissingInputError(f"model directory not found: {model_name[len('local-dir:'):]}")
    if pretrained and not open_clip.get_pretrained_cfg(model_name, pretrained) and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name) if open_clip.get_model_config(model_name) else []
        raise MissingInputError(
            f"--pretrained '{pretrained}' is neither a checkpoint file nor a known tag for {model_name}"
            + (f" (known tags: {', '.join(tags)})" if tags else "")
        )
    model_cfg = _model_cfg_for(model_name)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=precision
        )
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        # open_clip's and the hub's errors for an unknown name, weights it cannot fetch offline, or a checkpoint
        # torch refuses (weights_only): the user's to fix, so one line that keeps their message
        raise ModelLoadError(f"cannot load model {model_name!r}"
                             + (f" with --pretrained {pretrained!r}" if pretrained else "")
                             + f": {type(e).__name__}: {e}") from e
    tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedModel(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        model_name=model_name,
        model_cfg=model_cfg,
        preprocess_cfg=dict(get_model_preprocess_cfg(model)),
    )


def require_softmax_clip(model: torch.nn.Module, name: str) -> None:
    """Refuse model families TPC-CMA is not defined on; it needs a softmax-contrastive dual encoder (CLIP,
    CustomTextCLIP), because its objective builds on open_clip's softmax ``ClipLoss``."""
    if type(model).__name__ == "CoCa":
        raise ConfigError(f"{name} is a CoCa model (contrastive + captioning loss); cmalign fit supports "
                          "softmax-contrastive CLIP models only")
    if getattr(model, "logit_bias", None) is not None:
        raise ConfigError(f"{name} is a SigLIP-style model (sigmoid loss with logit_bias); cmalign fit's "
                          "objective builds on open_clip's softmax ClipLoss and would train it with the wrong loss")


_BLOCK_RE = re.compile(r"\.(?:resblocks|layers?|blocks|layer)\.(\d+)\.")
_PROJECTION_NAMES = ("visual.proj", "text_projection", "logit_scale", "logit_bias", "visual.head", "text.proj")


def _tower(name: str) -> str:
    return "image" if name.startswith("visual.") else ("shared" if name.startswith("logit_") else "text")


def select_trainable(model: torch.nn.Module, trainable: str) -> dict[str, int]:
    """Freeze all but the chosen part; returns trainable/total parameter counts for the log.

    ``all`` | ``image`` | ``text`` | ``projections`` | ``last:N`` (the last N transformer blocks of
    each tower, plus what follows them: final norms, projections, logit scale).
    """
    named = list(model.named_parameters())
    if trainable == "all":
        keep = {n for n, _ in named}
    elif trainable in ("image", "text"):
        keep = {n for n, _ in named if _tower(n) in (trainable, "shared")}
    elif trainable == "projections":
        keep = {n for n, _ in named if n.startswith(_PROJECTION_NAMES)}
    elif trainable.startswith("last:"):
        try:
            last_n = int(trainable.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--trainable last:N needs an integer N, got '{trainable}'") from None
        blocks: dict[str, int] = {}
        for n, _ in named:
            m = _BLOCK_RE.search(n)
            if m:
                blocks[_tower(n)] = max(blocks.get(_tower(n), -1), int(m.group(1)))
        keep = set()
        for n, _ in named:
            m = _BLOCK_RE.search(n)
            if m:
                if int(m.group(1)) > blocks[_tower(n)] - last_n:
                    keep.add(n)
            elif n.startswith(_PROJECTION_NAMES) or re.search(r"(ln_post|ln_final|final_layer_norm|\.norm\.)", n):
                keep.add(n)
    else:
        raise ConfigError(f"--trainable must be one of {', '.join(TRAINABLE_CHOICES)} or last:N, got '{trainable}'")
    for n, p in named:
        p.requires_grad_(n in keep)
    return {
        "trainable": sum(p.numel() for n, p in named if n in keep),
        "total": sum(p.numel() for _, p in named),
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms, embeddings and logit_scale."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if exclude(n, p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def save_local_dir(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir: str | os.PathLike,
                   extra: dict | None = None) -> Path:
    """Write open_clip's ``local-dir:`` layout (config JSON + safetensors), each file atomically."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out / "open_clip_model.safetensors", "wb") as f:
        f.write(safetensors_bytes(state))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if extra:
        config["cmalign"] = extra
    with atomic_write(out / "open_clip_config.json", "w") as f:
        json.dump(config, f, indent=2)
    return out
