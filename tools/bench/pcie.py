"""Host <-> GPU copy rates with pinned memory, as the streaming engine uses them: one
direction alone, both directions at once, and how long a small copy on a second stream
waits behind large copies queued on another (weights and offloaded activations share the
link). Needs torch with CUDA.   python3 tools/bench/pcie.py"""
import time

import torch

MB = 1 << 20
big_h = torch.empty(404 * MB, dtype=torch.uint8).pin_memory()
big_d = torch.empty(404 * MB, dtype=torch.uint8, device="cuda")
back_h = torch.empty(404 * MB, dtype=torch.uint8).pin_memory()
sm_h = torch.empty(64 * MB, dtype=torch.uint8).pin_memory()
sm_d = torch.empty(64 * MB, dtype=torch.uint8, device="cuda")
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()


def timed(f, reps=5):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def h2d():
    with torch.cuda.stream(s1):
        big_d.copy_(big_h, non_blocking=True)


def d2h():
    with torch.cuda.stream(s2):
        back_h.copy_(big_d, non_blocking=True)


def both():
    h2d()
    d2h()


gb = 404 * MB / 1e9
print(f"host->device alone: {gb / timed(h2d):.1f} GB/s")
print(f"device->host alone: {gb / timed(d2h):.1f} GB/s")
t = timed(both)
print(f"both at once: {t * 1e3:.2f} ms for 404 MB each way ({gb / t:.1f} GB/s per direction)")
for case in ("alone", "behind two 404 MB copies on another stream"):
    torch.cuda.synchronize()
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    e0.record(s1)
    s2.wait_event(e0)
    if case != "alone":
        with torch.cuda.stream(s1):
            big_d.copy_(big_h, non_blocking=True)
            big_d.copy_(big_h, non_blocking=True)
    with torch.cuda.stream(s2):
        sm_d.copy_(sm_h, non_blocking=True)
        e2.record(s2)
    e1.record(s1)
    torch.cuda.synchronize()
    print(f"64 MB host->device {case}: done after {e0.elapsed_time(e2):.2f} ms "
          f"(other stream done after {e0.elapsed_time(e1):.2f} ms)")
