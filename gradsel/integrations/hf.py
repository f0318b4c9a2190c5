"""HF ``Trainer`` integration: a callback that applies a selection and steps it.

Importing this module imports transformers; importing ``gradsel`` does not.

>>> # trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradselCallback(selection)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..selection import Selection

__all__ = ["GradselCallback"]


class GradselCallback(TrainerCallback):
    """Apply ``selection`` when training begins (with the Trainer's optimizer guarded), call
    ``handle.step()`` after every optimizer step, and remove it when training ends."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.handle = self.selection.apply(model, optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
