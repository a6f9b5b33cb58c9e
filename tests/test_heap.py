"""reuse_cpu_buffers: freed large CPU buffers stay in the heap, so allocating them again faults no pages in."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_trainer import make_trainer

from selfdistill import heap

ROOT = Path(__file__).resolve().parent.parent

# Page faults of allocating, touching and freeing a 128 MiB tensor three times, after six rounds of warm-up (with the
# heap kept, glibc's heap settles within two or three rounds).
PROBE = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "reuse":
        from selfdistill.heap import reuse_freed_buffers
        assert reuse_freed_buffers()
    def faults(rounds):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            x = torch.empty(32 * 2**20, dtype=torch.float32)
            x.fill_(1.0)
            del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    faults(6)
    print(faults(3))
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(heap._mallopt() is None, reason="needs Linux with glibc (mallopt)")
def test_a_freed_large_buffer_is_reused_without_new_page_faults():
    pages = 3 * 128 * 2**20 // 4096
    plain, reuse = _faults("plain"), _faults("reuse")
    assert plain > pages // 2        # each 128 MiB buffer is faulted in again (4 KiB pages; half allows huge pages)
    assert reuse < pages // 6        # ... and with the heap kept, reused in place: no round faults its pages again


@pytest.mark.parametrize("flag", [True, False])
def test_the_trainer_keeps_the_heap_on_cpu_only_when_asked(tmp_path, tokenizer, monkeypatch, flag):
    calls = []
    monkeypatch.setattr("selfdistill.trainer.reuse_freed_buffers", lambda: calls.append(1) or True)
    trainer = make_trainer(tmp_path, tokenizer, reuse_cpu_buffers=flag)
    assert trainer.reuses_cpu_buffers is flag
    assert len(calls) == int(flag)


def test_no_mallopt_means_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert heap.reuse_freed_buffers() is False
