"""Where the weights live, and moving them: pool blocks, host layers, the streamer, compaction.

Every device part of the model (each layer, and the non-layer weights) is packed into one block
of the typed memory pool as it loads. Layers the memory plan leaves on the host are packed into
pinned host buffers and streamed one layer ahead of compute (`runtime/streaming.py`); an
embedding the plan leaves on the host is packed into one too, and the GPU reads its tokens' rows
there (`kernels/host_rows.py`). Under a device budget the residency policy
(`runtime/placement.py`) moves the coldest layers to the host when the KV cache must grow, and
back once it shrinks; the engine asks at safe points only (between steps), and every move or
compaction changes `version`, so captured graphs recapture.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from metallic.models.kv_store import KVStore
from metallic.models.transformer import Transformer
from metallic.models.weights import (
    LayerWeights,
    ModelWeights,
    Part,
    formats,
    linear_tensors,
    tensors_of,
    with_tensors,
)
from metallic.runtime.memory import Block, MemoryPool
from metallic.runtime.placement import KVBudgetExceeded, MemoryPlan, ResidencyPolicy
from metallic.runtime.streaming import LayerStreamer, PackedLayer, pack, packed_size

log = logging.getLogger("metallic")


class Residency:
    def __init__(
        self, device: torch.device, memory: MemoryPool | None, plan: MemoryPlan | None
    ) -> None:
        """`memory`: the pool device parts move into (None: they stay as loaded);
        `plan`: the layer placement (None: everything on the device)."""
        self.device = device
        self.memory = memory
        self.plan = plan
        self.policy = ResidencyPolicy(plan) if plan is not None and plan.budget else None
        self.model: Transformer | None = None
        self.blocks: dict[str, Block] = {}  # the weights' pool blocks, by part name
        self.packed: dict[str, PackedLayer] = {}  # their layouts, to re-read a moved block
        self.slot_blocks: list[Block] = []
        self.host_layers: dict[int, PackedLayer] = {}
        self.host_embedding: PackedLayer | None = None
        self._on_host_mask: list[bool] = []  # which non-layer tensors the host buffer holds
        self.moves = 0  # layers moved either way; part of what a captured graph depends on

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever a weight or KV tensor may have moved (graphs recapture)."""
        return self.moves, self.memory.generation if self.memory is not None else 0

    def on_host(self, layer: int) -> bool:
        return self.plan is not None and not self.plan.on_device[layer]

    def adopt(self, name: str, part: ModelWeights | LayerWeights) -> object:
        """Each part of the model as it loads: device parts move into pool blocks (host layers
        are packed into pinned memory once the model exists)."""
        if self.memory is None:
            return part
        if isinstance(part, LayerWeights) and self.on_host(int(name.split(".")[1])):
            return part
        if isinstance(part, ModelWeights) and self.plan is not None and self.plan.host_fixed_bytes:
            return self._adopt_with_host_embedding(part, name)
        return self._to_pool(part, name)

    def _adopt_with_host_embedding(self, part: ModelWeights, name: str) -> ModelWeights:
        """The non-layer weights in a pool block, but for the embedding's tensors: those go
        to one pinned host buffer (a step reads a few of its rows across PCIe)."""
        tensors = tensors_of(part)
        embedding = {id(t) for t in linear_tensors(part.embedding)}
        self._on_host_mask = [id(t) in embedding for t in tensors]
        host = [t for t, h in zip(tensors, self._on_host_mask, strict=True) if h]
        device = [t for t, h in zip(tensors, self._on_host_mask, strict=True) if not h]
        self.host_embedding = pack(host, torch.device("cpu"), pin=self.device.type == "cuda")
        self._fill_block(name, device, formats(part))
        return with_tensors(part, self._fixed_tensors())

    def _fixed_tensors(self) -> list[torch.Tensor]:
        """The non-layer weights' tensors, from their pool block and (when the embedding is
        on the host) its host buffer, in `tensors_of` order."""
        device = iter(self.packed["output"].tensors())
        if self.host_embedding is None:
            return list(device)
        host = iter(self.host_embedding.tensors())
        return [next(host) if h else next(device) for h in self._on_host_mask]

    def install(self, model: Transformer) -> None:
        """Pack the plan's host layers and stream them to `model` from now on."""
        self.model = model
        for i in self.plan.host_layers if self.plan else ():
            self.host_layers[i] = self._pack_host(i)
        self._install_streamer()

    def _to_pool(self, part: Part, name: str, tensors: list[torch.Tensor] | None = None) -> Part:
        """`part` reading its `tensors` (default: its own) from one new pool block."""
        tensors = tensors_of(part) if tensors is None else tensors
        return with_tensors(part, self._fill_block(name, tensors, formats(part)).tensors())

    def _fill_block(self, name: str, tensors: list[torch.Tensor], quant: str) -> PackedLayer:
        """`tensors` packed into one new pool block of the weights kind, named `name`."""
        assert self.memory is not None
        size = packed_size(tensors)
        block = self.memory.allocate("weights", (size,), torch.uint8, quant=quant, name=name)
        self.blocks[name] = block
        self.packed[name] = pack(tensors, self.device, out=block.tensor)
        return self.packed[name]

    def _pack_host(self, layer: int) -> PackedLayer:
        """Layer `layer`'s tensors in one host buffer (pinned for asynchronous copies)."""
        assert self.model is not None
        tensors = tensors_of(self.model.weights.layers[layer])
        return pack(tensors, torch.device("cpu"), pin=self.device.type == "cuda")

    def _slot(self, n_bytes: int, name: str) -> torch.Tensor:
        """A streaming slot: a pool block (host layers exist only under a plan, which pools)."""
        assert self.memory is not None
        block = self.memory.allocate("weights", (n_bytes,), torch.uint8, name=name)
        self.slot_blocks.append(block)
        return block.tensor

    def _free_slots(self) -> None:
        """Release the streaming slots (the streamer that reads them is about to be replaced)."""
        assert self.memory is not None
        for block in self.slot_blocks:
            self.memory.free(block)
        self.slot_blocks = []

    def _install_streamer(self) -> None:
        """Point every host layer at its streaming slot (a new streamer per set of layers)."""
        assert self.model is not None
        if not self.host_layers:
            self.model.streamer = None
            return
        streamer = LayerStreamer(self.device, self.host_layers, allocate=self._slot)
        layers = self.model.weights.layers
        for i in streamer.layers:
            layers[i] = with_tensors(layers[i], streamer.device_views(i))
        self.model.streamer = streamer

    def _move_layers(self, moved: list[int], to_host: bool, store: KVStore) -> None:
        """Carry out a residency decision: the layers' bytes change sides, then the streamer is
        rebuilt. The old slots go first and the new ones come last, so the device never holds
        more than before or after the move."""
        assert self.memory is not None and self.model is not None  # a plan implies a pool
        self.synchronize()
        self._free_slots()  # nothing runs before the new streamer exists
        layers = self.model.weights.layers
        for i in moved:
            if to_host:
                self.host_layers[i] = self._pack_host(i)
                self.memory.free(self.blocks.pop(f"blk.{i}"))  # read from its slot from now on
                del self.packed[f"blk.{i}"]
            else:
                host = self.host_layers.pop(i)
                layers[i] = self._to_pool(layers[i], f"blk.{i}", host.tensors())
        self._install_streamer()
        self.moves += len(moved)
        side = "host (streamed)" if to_host else "device"
        log.info("residency: moved layers %s to the %s", moved, side)
        self.compact(store)

    def make_room(self, kv_bytes: int, extra: int, store: KVStore) -> bool:
        """Stream layers so that the KV cache can grow from `kv_bytes` by `extra` within the
        budget; False when even streaming every layer would not be enough (or no budget)."""
        if self.policy is None:
            return False
        try:
            moved = self.policy.make_room(kv_bytes, extra)
        except KVBudgetExceeded:
            return False
        if moved:
            self._move_layers(moved, to_host=True, store=store)
        return True

    def kv_limit(self) -> int | None:
        """The most KV-cache bytes the budget can ever give (every layer streamed)."""
        return None if self.policy is None else self.policy.kv_room_all_streamed()

    def restore(self, kv_bytes: int, store: KVStore) -> None:
        """Bring back the layers moved out that fit again beside `kv_bytes` of KV cache."""
        if self.policy is None:
            return
        back = self.policy.restorable(kv_bytes)
        if back:
            self._move_layers(back, to_host=False, store=store)

    def compact(self, store: KVStore) -> None:
        """At a safe point: compact the weights and KV kinds where fragmented (synchronized
        first, so no replay or copy in flight touches a block that moves), release empty
        arenas, and have the owners of moved blocks read them again."""
        memory = self.memory
        if memory is None:
            return
        kinds = ("weights", "kv")
        if any(memory.fragmented(kind) for kind in kinds):  # else no device sync is needed
            self.synchronize()
            generation = memory.generation
            for kind in kinds:
                memory.maybe_compact(kind)
            if memory.generation != generation:
                self._rebind()
                store.rebind()
        memory.trim()  # empty arenas go back to the device

    def _rebind(self) -> None:
        """Point the weights and the streaming slots at their moved blocks."""
        assert self.model is not None
        layers = self.model.weights.layers
        for name, block in self.blocks.items():
            self.packed[name] = replace(self.packed[name], buffer=block.tensor)
            if name == "output":  # the non-layer weights; the layer list stays the same
                self.model.weights = with_tensors(self.model.weights, self._fixed_tensors())
            else:
                i = int(name.split(".")[1])
                layers[i] = with_tensors(layers[i], self.packed[name].tensors())
        streamer = self.model.streamer
        if streamer is not None:
            streamer.slots = [block.tensor for block in self.slot_blocks]
            for i in streamer.layers:
                layers[i] = with_tensors(layers[i], streamer.device_views(i))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def weight_bytes(self) -> int:
        """Weights held on the device: the pool's weight blocks (resident parts and streaming
        slots) when there is a pool, else every tensor of the model."""
        if self.memory is None:
            assert self.model is not None
            return self.model.weights.nbytes
        return self.memory.stats()["kinds"]["weights"]["current_bytes"]

    def stats(self, n_layers: int) -> dict[str, int]:
        streamer = self.model.streamer if self.model is not None else None
        placement = {
            "layers_on_device": n_layers - len(self.host_layers),
            "layers_streamed": len(self.host_layers),
            "host_bytes": streamer.host_bytes if streamer else 0,  # what every step copies
            "host_embedding_bytes": self.host_embedding.nbytes if self.host_embedding else 0,
            "stream_slot_bytes": streamer.device_bytes if streamer else 0,
        }
        if self.policy is not None:
            placement |= {
                "budget_bytes": self.policy.budget,
                "evictions": self.policy.evictions,
                "restores": self.policy.restores,
            }
        return placement
