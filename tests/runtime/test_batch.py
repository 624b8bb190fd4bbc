"""Step metadata built straight into a captured graph's static input (what the runner does once
a graph of the step's shape exists)."""

import torch

from metallic.runtime.batch import SequenceChunk, StepBatch
from metallic.runtime.transfer import PinnedRing

CPU = torch.device("cpu")


def test_a_step_built_in_a_static_input_refreshes_it_in_place() -> None:
    first = StepBatch.build([SequenceChunk(7, [5], [[1, 2]])], CPU, table_width=2, max_keys=16)
    static = first.static_copy()
    ring = PinnedRing(CPU)
    step = StepBatch.build(
        [SequenceChunk(8, [6], [[1, 3]])],
        CPU,
        table_width=2,
        max_keys=16,
        upload=lambda flat: ring.upload(flat, out=static.packed),
    )
    assert step.packed.data_ptr() == static.packed.data_ptr()
    expected = StepBatch.build([SequenceChunk(8, [6], [[1, 3]])], CPU, table_width=2)
    assert torch.equal(static.packed, expected.packed)
    static.load(step)  # nothing to copy: the values are there already
    assert static.chunks == step.chunks and static.max_position == 8
    assert static.tokens.tolist() == [6] and static.block_tables[0].tolist() == [[1, 3]]
