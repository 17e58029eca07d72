"""The ops release the GIL while the C call runs: another Python thread keeps running."""
import threading

import torch

import nsa


def test_other_threads_run_during_a_call():
    torch.set_num_threads(1)
    T = 8192
    q, k, v = torch.randn(1, T, 16, 64), torch.randn(1, T, 1, 64), torch.randn(1, T, 1, 64)
    g = [torch.rand(1, T, 16) for _ in range(3)]
    inside, done = threading.Event(), threading.Event()
    real = nsa._core.fwd

    def marking_fwd(*args, **kw):  # marks the span of the C call itself
        inside.set()
        try:
            return real(*args, **kw)
        finally:
            done.set()

    nsa._core.fwd = marking_fwd
    try:
        worker = threading.Thread(target=lambda: nsa.native_sparse_attention(q, k, v, *g))
        worker.start()
        inside.wait()
        ticks = 0
        while not done.is_set():  # with the GIL held by the call, this loop could not run
            ticks += 1
        worker.join()
    finally:
        nsa._core.fwd = real
    # Tens of milliseconds of C time: an interpreter loop turns millions of times when free, and
    # at most a few times (between the event and entering C) when the GIL is held.
    assert ticks > 1000, f"only {ticks} iterations ran during the call"
