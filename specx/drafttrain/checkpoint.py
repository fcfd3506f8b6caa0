"""Training checkpoints: what the training loop needs to go on as if it had never stopped, in one safetensors file
replaced atomically (written beside, flushed, renamed), so that a process killed while writing leaves the previous
checkpoint whole.

    tensors   model.<name>              the draft's parameters
              optimizer.<i>.<name>      the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
              order                     the texts still to come in the current pass over the data, in order
              rng.torch, rng.cuda.<i>   torch's generators
    metadata  "specx": JSON             the training's identity, the step reached, the optimizer's param groups,
                                        the scheduler's state, the numpy generator's state, the log so far
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specx.drafttrain.workdir import replace_durably

FORMAT = "specx-train-checkpoint/1"


@dataclass(frozen=True)
class Position:
    """Where a checkpoint left the loop (the modules and the generator are restored in place)."""

    step: int  # optimizer steps done
    order: np.ndarray  # (texts left,) int64: the rest of the current pass
    log: dict  # the TrainLog's fields so far


def save_checkpoint(path: Path, identity: str, draft: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
                    position: Position) -> None:
    tensors = {f"model.{name}": value for name, value in draft.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    plain: dict[str, dict] = {}  # optimizer state that is not a tensor (none for AdamW)
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    tensors["order"] = torch.from_numpy(np.ascontiguousarray(position.order, np.int64))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {"format": FORMAT, "identity": identity, "step": position.step, "log": position.log,
            "param_groups": optimizer_state["param_groups"], "plain_state": plain,
            "scheduler": scheduler.state_dict(), "numpy": rng.bit_generator.state}
    _save(path, tensors, meta)


def load_checkpoint(path: Path, identity: str, draft: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator) -> Position | None:
    """Restore the modules and ``rng`` from the checkpoint at ``path``; None (nothing restored) when there is none
    or it belongs to another training."""
    meta = _metadata(path)
    if meta is None or meta.get("format") != FORMAT or meta.get("identity") != identity:
        return None
    tensors = load_file(path)
    draft.load_state_dict({name[len("model."):]: value for name, value in tensors.items()
                           if name.startswith("model.")})
    state: dict[int, dict] = {int(i): dict(values) for i, values in meta["plain_state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["numpy"]
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return Position(int(meta["step"]), tensors["order"].numpy(), dict(meta["log"]))


def save_draft(path: Path, draft: torch.nn.Module, identity: str) -> None:
    """The trained draft's parameters (float32, CPU)."""
    tensors = {name: value.detach().float().cpu() for name, value in draft.state_dict().items()}
    _save(path, tensors, {"format": FORMAT, "identity": identity})


def load_draft(path: Path, draft: torch.nn.Module) -> None:
    draft.load_state_dict(load_file(path))


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file({name: value.detach().contiguous().cpu() for name, value in tensors.items()}, partial,
              metadata={"specx": json.dumps(meta)})
    replace_durably(partial, path)


def _metadata(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with safe_open(path, "pt") as handle:
        return json.loads((handle.metadata() or {}).get("specx", "{}"))
