"""Choosing the next token for a batch of sequences, each with its own sampling parameters.

The logit processing follows llama.cpp's default sampler chain (common/sampling: ``penalties ->
dry -> top_n_sigma -> top_k -> typical_p -> top_p -> min_p -> xtc -> temperature -> dist``),
restricted to the stages metallic offers:

1. ``ignore_eos``: end-of-generation tokens get a logit of -inf (llama.cpp's ``--ignore-eos``).
2. penalties over the last ``penalty_last_n`` tokens of the sequence: repetition (divide a
   positive logit, multiply a negative one), then frequency (``count * f``) and presence (``p``
   once) subtracted.
3. top-k, 4. top-p, 5. min-p: all three judge probabilities at temperature 1, because
   temperature comes after them in the chain.
6. temperature, 7. one draw from the remaining distribution.

Temperature 0 is greedy: the argmax of the (penalised) logits; the filters cannot change it.

Everything runs as batched tensor ops on the logits' device; the only per-row Python work is one
uniform draw from each sequence's own CPU ``torch.Generator``. Drawing on the CPU keeps a seed's
token stream independent of the device and of which other sequences share the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from metallic.errors import MetallicError

MAX_PENALTY_WINDOW = 1 << 20


class SamplingError(MetallicError):
    """Sampling parameters or sampler calls that cannot be honoured."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be finite, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens; defaults match llama.cpp's command line."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """Whether the sequence's token history changes its logits (so it must be kept)."""
        return self.penalty_last_n > 0 and (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> None:
        """Raise SamplingError naming the first invalid parameter (user input reaches here)."""
        if _number("temperature", self.temperature) < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if _integer("top_k", self.top_k) < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= _number("min_p", self.min_p) <= 1:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise SamplingError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if not 0 <= _integer("penalty_last_n", self.penalty_last_n) <= MAX_PENALTY_WINDOW:
            raise SamplingError(
                f"penalty_last_n must be in [0, {MAX_PENALTY_WINDOW}], got {self.penalty_last_n}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= _number(name, value) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2] (0 = off), got {value}")
        if self.seed is not None and not 0 <= _integer("seed", self.seed) < 1 << 64:
            raise SamplingError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_tokens is not None and _integer("max_tokens", self.max_tokens) <= 0:
            raise SamplingError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not isinstance(self.stop, tuple):
            raise SamplingError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise SamplingError(f"stop strings must be non-empty strings, got {stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


def apply_penalties(
    logits: torch.Tensor,
    recent_tokens: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Return penalised copies of ``logits`` [B, V] given each row's recent tokens [B, W].

    ``-1`` in ``recent_tokens`` marks an empty slot. A token seen ``c > 0`` times gets
    ``l / r if l > 0 else l * r`` (llama.cpp's repetition penalty) minus ``c * frequency`` minus
    ``presence``; the penalties are [B] tensors. Work is O(B * W log W), never O(B * V) beyond
    the copy, so long windows and large vocabularies stay cheap.
    """
    valid = recent_tokens >= 0
    sorted_recent = torch.where(valid, recent_tokens, -1).sort(dim=1).values
    # Empty slots point at token 0 and are counted like any slot holding 0: every slot that
    # names a token computes the same value for it, so the scatter below has no conflicts.
    tokens = recent_tokens.clamp(min=0)
    counts = torch.searchsorted(sorted_recent, tokens, right=True) - torch.searchsorted(
        sorted_recent, tokens
    )
    original = logits.gather(1, tokens)
    rep = repetition_penalty[:, None]
    penalised = torch.where(original > 0, original / rep, original * rep)
    penalised = penalised - counts * frequency_penalty[:, None]
    penalised = penalised - presence_penalty[:, None]
    out = logits.clone()
    out.scatter_(1, tokens, torch.where(counts > 0, penalised, original))
    return out


def top_logprobs(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row and their log-probabilities under the raw logits.

    Returns ``(ids [B, k], logprobs [B, k])``, most likely first; meant for JSON output, so it
    reports the model's distribution, not the penalised/filtered one used for sampling.
    """
    if _integer("k", k) <= 0:
        raise SamplingError(f"top_logprobs k must be > 0, got {k}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logits.shape[-1]), dim=-1)
    return ids, values


@dataclass
class _Sequence:
    """One sequence's sampling state between steps."""

    params: SamplingParams
    generator: torch.Generator
    slot: int  # row of Sampler._history holding this sequence's recent tokens
    recorded: int  # tokens recorded so far; the next goes to column recorded % penalty_last_n


class _Strategy(Enum):
    """How a group of sampling rows gets its candidate list; the cheapest one that is exact."""

    TOP_K = "top_k"  # every row has 0 < top_k < V: a top-k of the largest k, sorted
    SORTED = "sorted"  # top-k off but top-p on: top-p needs the whole vocabulary in order
    VOCAB = "vocab"  # top-k and top-p off: min-p and temperature need no order at all


@dataclass
class _Group:
    """Sampling rows of a batch that share a strategy, with their parameters on the device."""

    strategy: _Strategy
    rows: list[int]
    rows_t: torch.Tensor
    width: int  # candidates per row for TOP_K: the largest top_k in the group
    temperature: torch.Tensor
    top_k: torch.Tensor  # as float, for comparison with candidate positions
    top_p: torch.Tensor  # inf when off
    log_min_p: torch.Tensor  # -inf when off


@dataclass
class _Penalties:
    """What a batch needs to apply and then record penalties, when any of its rows penalises."""

    slots: torch.Tensor  # [B] history row of every batch row
    repetition: torch.Tensor  # [B], 1 for rows that do not penalise
    presence: torch.Tensor  # [B], 0 for rows that do not penalise
    frequency: torch.Tensor  # [B], 0 for rows that do not penalise
    recording_rows: list[int]  # rows whose sequences keep a history
    recording_rows_t: torch.Tensor
    recording_slots_t: torch.Tensor


@dataclass
class _Batch:
    """Per-row parameters of one batch composition, on the device, reused while it repeats.

    Greedy rows belong to no group: they keep the argmax.
    """

    groups: list[_Group]
    ignore_eos: torch.Tensor | None  # rows that ignore EOS (int64 indices), None when none do
    penalties: _Penalties | None


class Sampler:
    """Per-sequence sampling state (generator, recent tokens) and batched token choice.

    Sequences are added with their parameters, sampled in any grouping and order (continuous
    batching), and removed when done. ``sample`` records each chosen token in its sequence's
    history, which the penalties read.
    """

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str = "cpu",
        eog_token_ids: Sequence[int] = (),
        upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`upload` moves small per-batch host tensors to the device without waiting for it
        (default: through freshly pinned memory)."""
        self.vocab_size = vocab_size
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0" for comparisons
        self._eog = torch.tensor(list(eog_token_ids), dtype=torch.long, device=self.device)
        self._minus_inf = torch.tensor(-math.inf, device=self.device)
        self._sequences: dict[int, _Sequence] = {}
        self._free_slots: list[int] = []
        self._history = torch.full((0, 0), -1, dtype=torch.long, device=self.device)
        self._batch_key: tuple[int, ...] | None = None
        self._batch: _Batch | None = None
        self._uploader = upload

    def add(self, seq_id: int, params: SamplingParams, history: Sequence[int] = ()) -> None:
        """Start sampling for ``seq_id``; ``history`` (e.g. the prompt) seeds the penalties."""
        params.validate()
        if seq_id in self._sequences:
            raise SamplingError(f"sequence {seq_id} is already being sampled")
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        generator = torch.Generator().manual_seed(seed)
        slot = self._allocate_slot(params.penalty_last_n if params.penalizes else 0)
        recent = list(history)[-params.penalty_last_n :] if params.penalizes else []
        if any(not 0 <= token < self.vocab_size for token in recent):
            raise SamplingError(
                f"history of sequence {seq_id} has token ids outside the vocabulary"
            )
        if recent:
            self._history[slot, : len(recent)] = torch.tensor(recent, device=self.device)
        self._sequences[seq_id] = _Sequence(params, generator, slot, len(recent))
        self._batch_key = None

    def remove(self, seq_id: int) -> None:
        """Forget a finished sequence and free its history row."""
        sequence = self._lookup(seq_id)
        del self._sequences[seq_id]
        self._free_slots.append(sequence.slot)
        self._batch_key = None

    def sample(
        self, logits: torch.Tensor, seq_ids: Sequence[int], in_place: bool = False
    ) -> torch.Tensor:
        """Choose one token per row of ``logits`` [B, V] (row i belongs to ``seq_ids[i]``).

        Returns int64 ids [B] on the logits' device and records them in each sequence's history.
        ``in_place``: the caller has no further use for ``logits``, so the end-of-generation
        mask is written into them instead of a copy (Gemma 3's 262,144 logits and the launches
        around their copy, in a decode step that takes a few hundred microseconds).
        """
        if logits.dim() != 2 or logits.shape != (len(seq_ids), self.vocab_size):
            raise SamplingError(
                f"logits of shape {tuple(logits.shape)} do not match"
                f" {len(seq_ids)} sequences x vocabulary {self.vocab_size}"
            )
        if logits.device != self.device:
            raise SamplingError(f"logits are on {logits.device}, the sampler on {self.device}")
        sequences = [self._lookup(seq_id) for seq_id in seq_ids]
        batch = self._batch_for(tuple(seq_ids), sequences)

        scores = logits.float()
        if batch.ignore_eos is not None and self._eog.numel():
            if not in_place and scores.data_ptr() == logits.data_ptr():
                scores = scores.clone()
            # A device scalar: a Python one would be copied from pageable memory, which waits
            # for the device to finish all the work queued before it.
            scores.index_put_((batch.ignore_eos[:, None], self._eog[None, :]), self._minus_inf)
        if batch.penalties is not None:
            penalties = batch.penalties
            scores = apply_penalties(
                scores,
                self._history[penalties.slots],
                penalties.repetition,
                penalties.presence,
                penalties.frequency,
            )
        if len(batch.groups) == 1 and len(batch.groups[0].rows) == len(sequences):
            tokens = self._draw(scores, batch.groups[0], sequences)  # one strategy for all rows
        else:
            tokens = scores.argmax(dim=1)  # greedy rows keep it
            for group in batch.groups:
                chosen = self._draw(scores.index_select(0, group.rows_t), group, sequences)
                tokens = tokens.index_copy(0, group.rows_t, chosen)
        self._record(tokens, batch, sequences)
        return tokens

    def _draw(
        self, scores: torch.Tensor, group: _Group, sequences: list[_Sequence]
    ) -> torch.Tensor:
        """top-k -> top-p -> min-p -> temperature -> inverse-CDF draw for one group's rows."""
        if group.strategy is _Strategy.TOP_K:
            values, ids = scores.topk(group.width, dim=1)
        elif group.strategy is _Strategy.SORTED:
            values, ids = scores.sort(dim=1, descending=True)
        else:
            values, ids = scores, None
        # The masks intersect, so their order is free once each sees the right probabilities:
        # top-p renormalises after top-k; min-p compares with the best token, which all keep.
        keep = values >= values.amax(dim=1, keepdim=True) + group.log_min_p[:, None]
        if ids is not None:  # candidates sorted, most likely first
            position = torch.arange(values.shape[1], device=self.device, dtype=values.dtype)
            in_top_k = position[None, :] < group.top_k[:, None]
            probs = torch.softmax(values.masked_fill(~in_top_k, -math.inf), dim=1)
            mass_before = probs.cumsum(dim=1) - probs  # exactly 0 for the top token: always kept
            keep &= in_top_k & (mass_before < group.top_p[:, None])
        scaled = values.masked_fill(~keep, -math.inf) / group.temperature[:, None]
        probs = torch.softmax(scaled, dim=1)
        cdf = probs.cumsum(dim=1)
        uniforms = torch.cat([torch.rand(1, generator=sequences[r].generator) for r in group.rows])
        target = self._upload(uniforms)[:, None] * cdf[:, -1:]
        choice = torch.searchsorted(cdf, target, right=True)
        # Rounding may push the target past the last cdf step: fall back to the last token that
        # has any probability (in vocabulary order too, a zero-probability token never wins).
        position = torch.arange(values.shape[1], device=self.device)
        last_possible = torch.where(probs > 0, position, 0).amax(dim=1, keepdim=True)
        choice = torch.minimum(choice, last_possible)
        return (choice if ids is None else ids.gather(1, choice)).squeeze(1)

    def _record(self, tokens: torch.Tensor, batch: _Batch, sequences: list[_Sequence]) -> None:
        penalties = batch.penalties
        if penalties is None:
            return
        columns = []
        for row in penalties.recording_rows:
            sequence = sequences[row]
            columns.append(sequence.recorded % sequence.params.penalty_last_n)
            sequence.recorded += 1
        columns_t = self._upload(torch.tensor(columns))
        self._history[penalties.recording_slots_t, columns_t] = tokens[penalties.recording_rows_t]

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """Copy per-step values to the device without waiting for the GPU.

        A copy from pageable memory first waits for the stream to drain; from pinned memory it is
        queued like a kernel (PyTorch's pinned-block cache keeps the block until it completes).
        """
        if self._uploader is not None:
            return self._uploader(host)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _lookup(self, seq_id: int) -> _Sequence:
        sequence = self._sequences.get(seq_id)
        if sequence is None:
            raise SamplingError(f"sequence {seq_id} was never added to the sampler")
        return sequence

    def _allocate_slot(self, window: int) -> int:
        rows, width = self._history.shape
        if window > width:
            extra = torch.full((rows, window - width), -1, dtype=torch.long, device=self.device)
            self._history = torch.cat([self._history, extra], dim=1)
        if not self._free_slots:
            grown = max(rows, 4)
            extra = torch.full(
                (grown, self._history.shape[1]), -1, dtype=torch.long, device=self.device
            )
            self._history = torch.cat([self._history, extra], dim=0)
            self._free_slots.extend(range(rows + grown - 1, rows - 1, -1))
        slot = self._free_slots.pop()
        self._history[slot] = -1
        return slot

    def _batch_for(self, key: tuple[int, ...], sequences: list[_Sequence]) -> _Batch:
        if key == self._batch_key and self._batch is not None:
            return self._batch
        if len(set(key)) != len(key):
            raise SamplingError("a sequence appears twice in one sampling batch")
        params = [s.params for s in sequences]
        vocab = self.vocab_size

        def on_device(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return self._upload(torch.tensor(values, dtype=dtype))

        def strategy(p: SamplingParams) -> _Strategy:
            if 0 < p.top_k < vocab:
                return _Strategy.TOP_K
            return _Strategy.SORTED if p.top_p < 1 else _Strategy.VOCAB

        groups = []
        for kind in _Strategy:
            rows = [r for r, p in enumerate(params) if not p.greedy and strategy(p) is kind]
            if not rows:
                continue
            chosen = [params[r] for r in rows]
            groups.append(
                _Group(
                    strategy=kind,
                    rows=rows,
                    rows_t=on_device(rows, torch.long),
                    width=max(p.top_k for p in chosen) if kind is _Strategy.TOP_K else vocab,
                    temperature=on_device([p.temperature for p in chosen]),
                    top_k=on_device([p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]),
                    top_p=on_device([p.top_p if p.top_p < 1 else math.inf for p in chosen]),
                    log_min_p=on_device(
                        [math.log(p.min_p) if p.min_p > 0 else -math.inf for p in chosen]
                    ),
                )
            )
        recording_rows = [r for r, p in enumerate(params) if p.penalizes]
        slots = [s.slot for s in sequences]
        penalties = None
        if recording_rows:
            penalties = _Penalties(
                slots=on_device(slots, torch.long),
                repetition=on_device([p.repetition_penalty for p in params]),
                presence=on_device([p.presence_penalty for p in params]),
                frequency=on_device([p.frequency_penalty for p in params]),
                recording_rows=recording_rows,
                recording_rows_t=on_device(recording_rows, torch.long),
                recording_slots_t=on_device([slots[r] for r in recording_rows], torch.long),
            )
        ignoring_eos = [r for r, p in enumerate(params) if p.ignore_eos]
        batch = _Batch(
            groups=groups,
            ignore_eos=on_device(ignoring_eos, torch.long) if ignoring_eos else None,
            penalties=penalties,
        )
        self._batch_key, self._batch = key, batch
        return batch
