"""Ctrl-C at any point of an engine's call: the model is left exactly as it was, the interrupt reaches the caller as
a KeyboardInterrupt, and the next call gives the same result as if nothing had happened."""
import random
import signal
import threading
import time

import pytest
import torch
from torch import nn

import mamlext
from test_fuzz import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signals reach the main thread only")


def conv_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).double()


def tasks():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (3, 4), generator=gen)
    return x, y, x.flip(1), y.flip(1)


def interrupted(call, delay: float) -> bool:
    """Runs call() with a SIGINT sent to this process after `delay` seconds; whether it ended in a
    KeyboardInterrupt. Any other exception propagates (the test fails)."""
    timer = threading.Timer(delay, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    stopped = False
    try:
        timer.start()
        try:
            call()
        except KeyboardInterrupt:
            stopped = True
        timer.join()
        settle = time.perf_counter() + 0.005
        while time.perf_counter() < settle:  # a signal sent after the call is handled here, in this loop
            pass
    except KeyboardInterrupt:
        pass
    return stopped


def call_duration(call) -> float:
    """The median of a few calls' durations (one call can be slowed by whatever else the machine does)."""
    durations = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    return sorted(durations)[2]


@pytest.mark.parametrize("memory", ["graph", "low"])
def test_an_interrupt_anywhere_leaves_the_model_as_it_was(memory):
    model = conv_batchnorm()
    maml = mamlext.BatchedMAML(model, inner_lr=0.1, inner_steps=2, loss="ce", memory=memory)
    data = tasks()
    want = maml.meta_loss(*data).item()
    duration = call_duration(lambda: maml.meta_loss(*data).backward())
    before = snapshot(model)
    hooks = [len(d) for d in (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)]
    rng = random.Random(0)
    stops = 0
    for attempt in range(60):
        stops += interrupted(lambda: maml.meta_loss(*data).backward(), rng.uniform(0, duration))
        assert_unchanged(model, before, f"attempt {attempt}")
        assert [len(d) for d in (nn.modules.module._global_forward_hooks,
                                 nn.modules.module._global_forward_pre_hooks)] == hooks, f"attempt {attempt}"
        assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0, f"attempt {attempt}"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, f"attempt {attempt}"
    assert stops >= 5, f"only {stops} of 60 interrupts landed inside a call"
    for p in model.parameters():
        p.grad = None
    assert maml.meta_loss(*data).item() == want  # the next call is as if nothing had happened


def test_an_interrupt_of_adapt_and_anil_leaves_the_models_as_they_were():
    model = conv_batchnorm()
    data = tasks()
    maml = mamlext.BatchedMAML(model, inner_lr=0.1, inner_steps=3, loss="ce")
    anil = mamlext.ANIL(model[:-1], nn.Linear(75, 4).double(), inner_lr=0.1, loss="ce")
    before = snapshot(model)
    rng = random.Random(1)
    for call in (lambda: maml.adapt(data[0], data[1]), lambda: anil.meta_loss(*data).backward()):
        duration = call_duration(call)
        for attempt in range(30):
            interrupted(call, rng.uniform(0, duration))
            assert_unchanged(model, before, f"attempt {attempt}")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
