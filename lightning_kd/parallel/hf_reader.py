"""DCP's Hugging Face storage reader, reading one tensor per safetensors handle.

Imported only where a Hugging Face directory is loaded with sharded loading: it needs a torch
that ships ``torch.distributed.checkpoint.HuggingFaceStorageReader`` (written against torch
2.13's reader, whose ``storage_data`` maps each stored chunk to its file's
``relative_path``).
"""

from __future__ import annotations

from torch.distributed.checkpoint import HuggingFaceStorageReader, LoadPlan, LoadPlanner
from torch.futures import Future

__all__ = ["TensorAtATimeReader"]


class TensorAtATimeReader(HuggingFaceStorageReader):
    """DCP's Hugging Face storage reader, opening the safetensors file anew for each tensor.

    A safetensors handle memory-maps its whole file, and every page a read touches stays
    resident, counted in the process's memory, until the handle closes. The stock reader keeps
    one handle per file for all of the file's reads, so a rank that reads column slices (a
    row-parallel weight's slice touches every page of the tensor) ends up holding most of the
    file: about half of a 575 MiB teacher per rank at TP=2 x DP=2. One handle per tensor bounds
    the transient to the largest tensor this rank reads. DCP still plans which slices each rank
    reads; only the file handling differs. Reads run in the calling thread (the stock reader's
    ``thread_count`` is not used).
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from safetensors import safe_open

        for item in plan.items:
            file_name = self.storage_data[item.storage_index].relative_path
            index = tuple(
                slice(offset, offset + length)
                for offset, length in zip(item.storage_offsets, item.lengths, strict=True)
            )
            with safe_open(filename=file_name, framework="pt") as handle:
                stored = handle.get_slice(item.storage_index.fqn)[index]
            target = planner.resolve_tensor(item).detach()
            if target.shape != stored.shape:
                raise ValueError(
                    f"{file_name!r}: {item.storage_index.fqn!r} read as {tuple(stored.shape)}, "
                    f"expected {tuple(target.shape)}."
                )
            target.copy_(stored)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done
