"""``retained_heap``: inside it a freed block serves the next allocation without new page faults,
after it glibc unmaps large blocks again and the free heap goes back to the kernel; nesting, the
opt-outs, and CPU inference running inside it. Each allocator check runs in a fresh process (glibc's
settings are process-wide) with ``malloc``/``free`` through ctypes, so no allocator cache hides them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from app.runtime import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc only")

CODE = r"""
import ctypes, json, resource, sys
from app.runtime.heap import retained_heap, heap_is_managed
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
N = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mapped afresh each time by default

def faults_of_second_block():
    for i in range(2):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(N); libc.memset(p, 1, N); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

out = {"managed": heap_is_managed(), "before": faults_of_second_block()}
with retained_heap():
    with retained_heap():
        out["inner"] = faults_of_second_block()
    out["outer_after_inner"] = faults_of_second_block()  # the inner block's end changes nothing
    rss0 = rss_mib()
    p = libc.malloc(4 * N); libc.memset(p, 1, 4 * N); libc.free(p)
    out["kept_mib"] = rss_mib() - rss0
rss1 = rss_mib()
out["returned_mib"] = rss0 + out["kept_mib"] - rss1
out["after"] = faults_of_second_block()
print(json.dumps(out))
"""

PAGES = (64 << 20) // 4096


def _untuned(environ) -> dict[str, str]:
    """The environment without the settings that make ``retained_heap`` leave glibc alone."""
    return {
        k: v
        for k, v in environ.items()
        if k not in ("SEGAPP_RETAIN_HEAP", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")
    }


def _run(**env: str) -> dict:
    base = _untuned(os.environ)
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env={**base, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_freed_blocks_are_reused_inside_and_unmapped_and_returned_after():
    got = _run()
    assert got["managed"]
    assert got["before"] > 0.9 * PAGES  # glibc maps a 64 MiB block afresh: every page faults again
    assert got["inner"] < 0.05 * PAGES and got["outer_after_inner"] < 0.05 * PAGES
    assert got["kept_mib"] > 150  # a freed 256 MiB block stays in the heap (64 MiB of it was there already)
    assert got["returned_mib"] > 200  # and goes back to the kernel when the last block ends
    assert got["after"] > 0.9 * PAGES  # large blocks are mapped and unmapped again


@pytest.mark.parametrize(
    "env",
    [
        {"SEGAPP_RETAIN_HEAP": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    ],
)
def test_a_user_tuned_allocator_or_the_opt_out_is_left_alone(env):
    got = _run(**env)
    assert not got["managed"]
    assert got["inner"] > 0.9 * PAGES and got["kept_mib"] < 50


class _RecordingNet(torch.nn.Module):
    """Two-class logits from the intensity sign; records whether each call ran inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(heap.retaining())
        return torch.cat([-x, x], dim=1)


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_inference_runs_its_network_inside_the_block(fast, monkeypatch):
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer

    from app.inference.predictor import BundlePredictor

    for key in set(os.environ) - set(_untuned(os.environ)):
        monkeypatch.delenv(key)
    net = _RecordingNet()
    predictor = BundlePredictor(net, [], SlidingWindowInferer((16, 16, 8), 2, 0.25), "cpu")
    arr = np.random.default_rng(0).normal(size=(1, 24, 20, 12)).astype(np.float32)
    image = MetaTensor(torch.as_tensor(arr), affine=torch.eye(4, dtype=torch.float64), meta={"space": "RAS"})
    pred = predictor.predict_metatensor(image, fast=fast)
    np.testing.assert_array_equal(pred.labels, (arr[0] > 0).astype(np.uint8))
    assert len(net.seen) > 1 and all(net.seen) and not heap.retaining()
