"""ModelGuard: whatever ends an engine's call (an error, Ctrl-C at any point), the user's model is left exactly as it
was and an interrupt reaches the caller as a KeyboardInterrupt.

The generic engine puts its per-task tensors into the model's parameter and buffer slots while it runs
(torch.func.functional_call), installs global module hooks and enters torch.func transforms; an interrupt at the
wrong moment (inside functional_call's own restore, say) would leave vmap tensors in the model, hooks installed
and transforms or forward-AD levels entered, and a KeyboardInterrupt raised inside PyTorch's C++ may come back as a RuntimeError. So a
call records every slot of the model, the global hooks and the autograd state on entry; on a failure it puts them
back; and while it runs, SIGINT goes through a handler that notes it, so that the interrupt is re-raised as itself
once the model is restored (and is held back while the guard itself runs, so that the restore is never cut short).
"""
import signal
import threading
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.autograd import forward_ad

_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs") if hasattr(nn.modules.module, name))


class ModelGuard:
    """``with ModelGuard(model): ...``: see the module docstring. Re-entrant use is fine (the inner guard restores
    what it saw)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> "ModelGuard":
        self.interrupted = False
        self.slots: List[Tuple[dict, dict]] = [(d, d.copy()) for m in self.model.modules()
                                               for d in (m._parameters, m._buffers)]
        self.hooks: List[Tuple[dict, Dict]] = [(d, d.copy()) for d in _GLOBAL_HOOKS]
        # The autograd state the transforms change and restore in Python context managers, which an interrupt can cut
        # short: torch.func levels, forward-AD levels, grad modes, torch function modes.
        self.depth = torch._C._functorch.get_dynamic_layer_stack_depth()
        self.dual_level = forward_ad._current_level
        self.grad_modes = (torch.is_grad_enabled(), torch._C._is_fwd_grad_enabled())
        self.function_modes = torch._C._len_torch_function_stack()
        self.previous = None
        # Only where Python's own KeyboardInterrupt handler is installed (a program with its own SIGINT handler keeps
        # it), and only in the main thread (where signal handlers run).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def _on_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        if frame is None or frame.f_code not in (ModelGuard.__enter__.__code__, ModelGuard.__exit__.__code__):
            raise KeyboardInterrupt  # interrupt the work; __exit__ restores the model

    def __exit__(self, kind, error, traceback) -> bool:
        # Plain loops and C calls in this frame only (no comprehension, no Python helper: their frames are not this
        # one): _on_interrupt holds an interrupt back while this frame runs.
        if kind is not None or self.interrupted:
            if torch._C._functorch.get_dynamic_layer_stack_depth() > self.depth:  # transforms left entered
                torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(self.depth)
            level = torch._C._enter_dual_level()  # one above the innermost forward-AD level PyTorch holds
            while level > self.dual_level:
                torch._C._exit_dual_level(level=level)
                level -= 1
            forward_ad._current_level = self.dual_level
            while torch._C._len_torch_function_stack() > self.function_modes:
                torch._C._pop_torch_function_stack()
            torch._C._set_grad_enabled(self.grad_modes[0])
            torch._C._set_fwd_grad_enabled(self.grad_modes[1])
            for current, saved in self.slots:
                current.clear()
                current.update(saved)
            for current, saved in self.hooks:
                for key in tuple(current.keys() - saved.keys()):
                    del current[key]
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.interrupted:
            raise KeyboardInterrupt
        return False

