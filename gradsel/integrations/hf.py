"""HF ``Trainer`` integration: a callback that applies a selection and steps it, and the sparse optimizer.

Importing this module imports transformers; importing ``gradsel`` does not.

Two ways to train, one callback:

- dense: ``Trainer(..., callbacks=[GradselCallback(sel)])``; the Trainer's own AdamW, guarded;
- sparse (optimizer state for the selected elements only):
  ``Trainer(..., optimizers=(sparse_trainer_optimizer(sel, model, args), None), callbacks=[GradselCallback(sel)])``.

In both, the Trainer's gradient clipping sees exactly the selected entries (the masked gradients are
zeroed as backward accumulates them), its scheduler sets the learning rate, and its no-decay rule
holds. The callback writes the selection state (a progressive policy's controller included) into each
checkpoint folder and restores it when training resumes from one.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..errors import GradselError
from ..masking import unwrap_optimizer
from ..optim import SparseAdamW, sparse_adamw
from ..selection import Selection

__all__ = ["GradselCallback", "sparse_trainer_optimizer", "STATE_NAME"]

logger = logging.getLogger(__name__)

STATE_NAME = "gradsel_state.pt"
"""File the callback writes into every Trainer checkpoint folder."""


def sparse_trainer_optimizer(selection: Selection, model: torch.nn.Module, args, **kwargs: Any) -> SparseAdamW:
    """A :class:`gradsel.optim.SparseAdamW` with the Trainer's AdamW settings, for ``Trainer(optimizers=...)``.

    Learning rate, betas, eps and weight decay come from ``args`` (``TrainingArguments``); the parameters that
    the Trainer's ``get_decay_parameter_names`` leaves out (biases, LayerNorm weights) get no weight decay.
    Parameters with no selected element stop requiring grad. Use it with :class:`GradselCallback`, which keeps
    the Trainer's gradient clipping on the selected entries.

    Args:
        selection: the selection made for ``model``.
        model: the model given to the Trainer.
        args: the ``TrainingArguments``.
        **kwargs: passed on to :func:`gradsel.optim.sparse_adamw` (e.g. ``no_decay=`` to override the rule).

    Returns:
        The optimizer; pass ``optimizers=(optimizer, None)`` so that the Trainer builds its scheduler over it.
    """
    decay = set(Trainer.get_decay_parameter_names(None, model))  # the method reads nothing from the Trainer
    skip = {n for n, _ in model.named_parameters() if n not in decay}
    options = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
                   no_decay=(lambda name, _p: name in skip) if skip else None)
    options.update(kwargs)
    return sparse_adamw(selection, model, args.learning_rate, **options)


class GradselCallback(TrainerCallback):
    """Apply ``selection`` when training begins, call ``handle.step()`` after every optimizer step, save and
    restore its state with the Trainer's checkpoints, and remove it when training ends.

    With the Trainer's own optimizer the masked entries are guarded (they never move). With a
    :class:`gradsel.optim.SparseAdamW` (see :func:`sparse_trainer_optimizer`) only the gradient masking is
    applied (the optimizer never writes outside the selection) and the optimizer follows the masks that a
    progressive policy shrinks. When the handle reports ``done`` (a progressive policy froze everything it
    may), training stops, unless ``stop_when_done=False``.

    Args:
        selection: the selection to train.
        resume_from: the checkpoint folder to read the selection state from when resuming; by default
            ``args.resume_from_checkpoint`` or ``{output_dir}/checkpoint-{global_step}``.
        stop_when_done: stop training once the handle reports ``done`` (default). ``False`` trains for the
            steps the ``TrainingArguments`` ask for, what the policy left trainable (the floor) included.
    """

    def __init__(self, selection: Selection, resume_from: str | os.PathLike | None = None,
                 stop_when_done: bool = True):
        self.selection = selection
        self.resume_from = resume_from
        self.stop_when_done = stop_when_done
        self.handle = None
        self.sparse: SparseAdamW | None = None
        self._seen: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor] = {}

    # -- training ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.sparse = opt if isinstance(opt, SparseAdamW) else None
        self._refuse_ddp_freezing(args, model)
        if self.sparse is not None:
            with warnings.catch_warnings():  # the sparse optimizer needs no guard: it never writes outside the masks
                warnings.filterwarnings("ignore", message="Selection.apply without an optimizer")
                self.handle = self.selection.apply(model, None)
        else:
            self.handle = self.selection.apply(model, opt)
        self._params = dict(model.named_parameters())
        if state.global_step > 0:
            self._restore(args, state)
        self._sync()

    def _refuse_ddp_freezing(self, args, model) -> None:
        """Under the Trainer's DDP the model was wrapped before this callback runs, so a tensor the selection
        freezes whole from now on (at ``apply`` in dense mode, or later for a progressive policy such as
        jsdrift, in either mode) never reports its gradient to DDP's reducer; with
        ``find_unused_parameters=False`` the ranks then wait for it. Raise before training instead."""
        if getattr(args, "world_size", 1) <= 1 or getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            return
        find = getattr(args, "ddp_find_unused_parameters", None)
        if find is None:  # the Trainer's own default (Trainer._build_accelerator_args, transformers 5)
            from transformers import PreTrainedModel

            checkpointing = bool(getattr(model, "is_activation_checkpointing", False)
                                 or getattr(model, "is_gradient_checkpointing", False)
                                 or getattr(args, "activation_checkpointing", False))
            find = not checkpointing if isinstance(model, PreTrainedModel) else True
        if find:
            return
        params = dict(model.named_parameters())
        frozen = [n for n, m in self.selection.masks.items()
                  if n in params and params[n].requires_grad and not bool(m.any())]
        progressive = bool(getattr(self.selection.policy_object(), "progressive", False))
        if not frozen and not progressive:
            return
        unused = ("set TrainingArguments(ddp_find_unused_parameters=True) (DDP then all-reduces zeros for the "
                  "frozen tensors and walks the autograd graph every step)")
        if progressive:
            what = (f"uses the progressive policy {self.selection.policy!r}, which freezes whole tensors during "
                    "training, after the Trainer wrapped the model (sparse mode does not avoid this)")
            fixes = unused[0].upper() + unused[1:]
        else:
            what = (f"freezes {len(frozen)} whole tensor(s) (first {frozen[0]!r}) when the callback applies it, "
                    "after the Trainer wrapped the model")
            fixes = ("Either train in sparse mode, optimizers=(sparse_trainer_optimizer(selection, model, args), "
                     "None), which freezes them before the Trainer wraps the model, or " + unused)
        raise GradselError(
            f"the Trainer runs {args.world_size} processes under DDP with find_unused_parameters=False, and this "
            f"selection {what}: DDP would wait for their gradients, which never come. {fixes}.")

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is None:
            return
        self.handle.step()
        self._sync()
        if self.stop_when_done and getattr(self.handle, "done", False) and not control.should_training_stop:
            logger.warning("gradsel: the progressive policy has frozen every group it may freeze (handle.done); "
                           "stopping training at step %d", state.global_step)
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.sparse = None

    def _sync(self) -> None:
        """Shrink the sparse optimizer to masks that the policy changed (identity check, cheap)."""
        masks = self.selection.masks
        self._seen = self.sparse.follow(masks, self._params, self._seen) if self.sparse is not None else dict(masks)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self.handle is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("gradsel: no checkpoint folder %s; the selection state was not saved", folder)
            return
        torch.save({"global_step": state.global_step, "handle": self.handle.state_dict()},
                   os.path.join(folder, STATE_NAME))

    def _restore(self, args, state) -> None:
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in candidates:
            if not isinstance(folder, (str, os.PathLike)):
                continue
            path = os.path.join(folder, STATE_NAME)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if int(saved["global_step"]) != state.global_step:
                continue
            self.handle.load_state_dict(saved["handle"])
            return
        if self.handle.controller is not None:
            raise GradselError(f"resuming at step {state.global_step}, but no {STATE_NAME} for that step was found "
                               f"in {[str(c) for c in candidates if c]}: the progressive policy's state cannot be "
                               "restored. Pass GradselCallback(selection, resume_from='path/to/checkpoint-N')")
        self.handle.steps = state.global_step
