"""PyTorch Lightning integration: a callback that applies a selection and steps it, and the sparse optimizer.

Importing this module imports lightning; importing ``gradsel`` does not.

>>> # class Net(L.LightningModule):
>>> #     def configure_optimizers(self):
>>> #         return sparse_optimizer(self.selection, self, lr=1e-3, weight_decay=0.01)
>>> # L.Trainer(callbacks=[GradselCallback(selection)]).fit(Net(), ckpt_path=...)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ..errors import GradselError
from ..masking import unwrap_optimizer
from ..optim import SparseAdamW, sparse_adamw
from ..selection import Selection

__all__ = ["GradselCallback", "sparse_optimizer"]

logger = logging.getLogger(__name__)


def sparse_optimizer(selection: Selection, module: nn.Module, lr: float = 1e-3, **kwargs: Any) -> SparseAdamW:
    """A :class:`gradsel.optim.SparseAdamW` for ``configure_optimizers``: state for the selected elements only.

    Args:
        selection: the selection, made for ``module`` (the LightningModule or the model inside it that the
            callback is given).
        module: the module whose parameters the selection names.
        lr: learning rate (a scheduler returned next to the optimizer drives ``param_groups``' ``lr``).
        **kwargs: as :func:`gradsel.optim.sparse_adamw` (``weight_decay``, ``betas``, ``no_decay`` such as
            ``["*.bias", nn.LayerNorm]``, ...).
    """
    return sparse_adamw(selection, module, lr, **kwargs)


class GradselCallback(Callback):
    """Apply ``selection`` at ``on_fit_start``, call ``handle.step()`` after every optimizer step, keep its state
    in Lightning checkpoints (``state_dict`` / ``load_state_dict``), and remove it at ``on_fit_end``.

    With a torch optimizer from ``configure_optimizers`` the masked entries are guarded; with
    :func:`sparse_optimizer` only the gradients are masked (so ``gradient_clip_val`` sees the selected entries)
    and the optimizer follows the masks a progressive policy shrinks. When the handle reports ``done``,
    ``trainer.should_stop`` is set, unless ``stop_when_done=False``.

    Args:
        selection: the selection to train.
        module: the attribute of the LightningModule that holds the model the selection was made for
            (e.g. ``"model"``); default: the LightningModule itself.
        stop_when_done: stop training once the handle reports ``done`` (default); ``False`` trains for the
            steps the Trainer was given, what the policy left trainable included.
    """

    def __init__(self, selection: Selection, module: str | None = None, stop_when_done: bool = True):
        self.selection = selection
        self.module = module
        self.stop_when_done = stop_when_done
        self.handle = None
        self.sparse: SparseAdamW | None = None
        self._pending: dict | None = None
        self._seen_step = 0
        self._seen: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor] = {}

    def _target(self, pl_module) -> nn.Module:
        if self.module is None:
            return pl_module
        target = getattr(pl_module, self.module, None)
        if not isinstance(target, nn.Module):
            raise GradselError(f"GradselCallback(module={self.module!r}): {type(pl_module).__name__} has no "
                               "sub-module of that name; pass the attribute that holds the selected model")
        return target

    # -- fit -----------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        model = self._target(pl_module)
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        sparse = [o for o in optimizers if isinstance(o, SparseAdamW)]
        if len(optimizers) > 1:
            raise GradselError(f"GradselCallback supports one optimizer, configure_optimizers returned "
                               f"{len(optimizers)}")
        self.sparse = sparse[0] if sparse else None
        if self.sparse is not None or not optimizers:
            with warnings.catch_warnings():  # the sparse optimizer needs no guard: it never writes outside the masks
                warnings.filterwarnings("ignore", message="Selection.apply without an optimizer")
                self.handle = self.selection.apply(model, None)
        else:
            self.handle = self.selection.apply(model, optimizers[0])
        self._params = dict(model.named_parameters())
        if self._pending is not None:
            self.handle.load_state_dict(self._pending)
            self._pending = None
        elif trainer.ckpt_path and self.handle.controller is not None:
            raise GradselError(f"resuming from {trainer.ckpt_path}, which holds no GradselCallback state: the "
                               "progressive policy's state cannot be restored (the checkpoint was saved without "
                               "this callback)")
        self._seen = {}
        self._sync()

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step  # after Lightning restored the loops

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.handle is None or trainer.global_step == self._seen_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._seen_step = trainer.global_step
        self.handle.step()
        self._sync()
        if self.stop_when_done and getattr(self.handle, "done", False) and not trainer.should_stop:
            logger.warning("gradsel: the progressive policy has frozen every group it may freeze (handle.done); "
                           "stopping training at step %d", trainer.global_step)
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.sparse = None

    def _sync(self) -> None:
        """Shrink the sparse optimizer to masks that the policy changed (identity check, cheap)."""
        masks = self.selection.masks
        self._seen = self.sparse.follow(masks, self._params, self._seen) if self.sparse is not None else dict(masks)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.handle is None:
            return {} if self._pending is None else {"handle": self._pending}
        return {"handle": self.handle.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "handle" not in state_dict:
            return
        if self.handle is not None:
            self.handle.load_state_dict(state_dict["handle"])
            self._sync()
        else:
            self._pending = state_dict["handle"]  # restored before on_fit_start: applied there
