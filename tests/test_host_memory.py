"""hold_freed_memory: a decoding process keeps what it frees instead of faulting it in again."""

import subprocess
import sys

import pytest

# A step's tensors, freed and allocated again a little larger each step (logits, attention
# scratch growing with the context); the minor page faults the 200 steps take.
STEPS = """
import resource, sys, torch
if sys.argv[1] == "hold":
    from specbatch.decoding.host_memory import hold_freed_memory
    assert hold_freed_memory()
def step(i):
    x = torch.ones(262144 + 4096 * i)
    return float(x[-1])
step(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(1, 201):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_kept_for_the_next_step_instead_of_faulted_in_again():
    default, held = faults("default"), faults("hold")
    assert default > 200 * 100  # every step maps its megabyte afresh: a page fault per 4 KiB page
    assert held < default / 20
