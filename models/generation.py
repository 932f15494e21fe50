"""Continuous batching: sequences join between decode steps and leave when finished.

The model runs through one or more `KVRunner`s (models/kv_runner.py), which hold the KV caches:
one for a whole model, one per pipeline stage for a split one, the output of each feeding the
next. Sampling, stop strings and detokenization happen here, on the last runner's logits. Bounded by
`max_batch_size` sequences and `max_batch_tokens`
(prompt + max_tokens summed over running sequences).

Micro-batches (`microbatches` > 1, for pipeline stages): the running sequences are split into
groups that take turns, one per `step()`: a group's turn samples the tokens of its last decode,
admits and prefills waiting sequences, and launches its next decode. Remote stages answer later
(a DeploymentResponse), so while one group's decode is in stage 1 the next group's is launched
into stage 0: every stage works at once. A sequence stays in its group for life, and each stage
keeps a batch cache per group. Tokens are the same whatever the grouping: each row is computed
on its own, and each sequence samples from its own generator.

Thread-safety: `add` and `abort` may be called from any thread; `step` from one thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from models.causal_lm import CausalLM
from models.kv_runner import KVRunner
from models.params import SamplingParams


@dataclass
class StepOutput:
    seq_id: str
    text: str  # newly final text (may be empty while a possible stop string is held back)
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Seq:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (incrementally: see _detokenize)
    prefix_offset: int = 0  # out[prefix_offset:read_offset] is the context the next token is decoded in
    read_offset: int = 0
    emitted: int = 0  # characters of text already sent
    finish: str | None = None
    group: int = 0  # its micro-batch group, for life

    @property
    def max_tokens(self) -> int:  # resolved by the caller (the Generator) before `add`
        assert self.params.max_tokens is not None
        return self.params.max_tokens

    @property
    def length(self) -> int:  # tokens in the cache
        return len(self.prompt) + len(self.out) - 1


class Engine:
    def __init__(
        self,
        lm: CausalLM,
        max_batch_size: int = 32,
        max_batch_tokens: int = 65536,
        runners: list[Any] | None = None,  # KVRunners, or RemoteRunners of pipeline stages
        microbatches: int = 1,
    ):
        self.lm = lm  # tokenizer, EOS ids; its weights are used only when no runners are given
        self.runners: list[Any] = runners or [KVRunner(_weights(lm), lm.device)]  # KVRunners or remote stages
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.microbatches = microbatches
        self.turn = 0  # the group whose turn the next step is
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._aborted: set[str] = set()
        self._launched: dict[int, tuple[list[_Seq], object]] = {}  # group -> (its sequences, its decode's answer)
        self._to_drop: dict[int, list[str]] = {}  # group -> ids to drop once its decode in flight is back
        self._lock = threading.Lock()

    def add(self, seq_id: str, prompt: list[int], params: SamplingParams) -> None:
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        with self._lock:
            self._waiting.append(_Seq(seq_id, list(prompt), params, gen))

    def abort(self, seq_id: str) -> None:
        with self._lock:
            self._aborted.add(seq_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._launched)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def drop_all(self) -> list[str]:
        """Forget every sequence (after a failed step); returns their ids."""
        with self._lock:
            ids = [s.id for s in self._running] + [s.id for s in self._waiting]
            self._running, self._waiting = [], deque()
            self._aborted.clear()
            self._launched.clear()
            self._to_drop.clear()
            for runner in self.runners:
                runner.reset()
            return ids

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One group's turn (with one group, a whole decode step): the tokens of its last decode, the
        waiting sequences admitted and prefilled, then its next decode launched."""
        group, self.turn = self.turn, (self.turn + 1) % self.microbatches
        admitted, aborted = self._admit()
        outputs = []
        seqs, answer = self._launched.pop(group, ([], None))
        if seqs:
            logits = _resolved(answer)
            rows = [i for i, s in enumerate(seqs) if s.finish is None and s.id not in aborted]
            live = [seqs[i] for i in rows]
            outputs += [self._emit(s, t) for s, t in zip(live, self._sample(logits[rows], live))]
        outputs += [self._emit(s, self._prefill(s)) for s in admitted]
        for s in [*aborted.values(), *(s for s in self._running if s.finish is not None)]:
            self._to_drop.setdefault(s.group, []).append(s.id)
        self._running = [s for s in self._running if s.finish is None]
        # A group's sequences are dropped only while none of its decodes is in flight in the stages.
        gone = [i for g in [g for g in self._to_drop if g not in self._launched] for i in self._to_drop.pop(g)]
        if gone:
            for runner in self.runners:
                runner.drop(gone)
        mine = [s for s in self._running if s.group == group]
        if mine:
            self._launched[group] = (mine, self._decode(mine, group))
        return outputs

    def _admit(self) -> tuple[list[_Seq], dict[str, _Seq]]:
        """Sequences admitted now (each into the smallest group), and the aborted ones by id."""
        with self._lock:
            aborted = {s.id: s for s in self._running if s.id in self._aborted}
            if self._aborted:
                self._running = [s for s in self._running if s.id not in self._aborted]
                self._waiting = deque(s for s in self._waiting if s.id not in self._aborted)
                self._aborted.clear()
            budget = self.max_batch_tokens - sum(len(s.prompt) + s.max_tokens for s in self._running)
            sizes = [0] * self.microbatches
            for s in self._running:
                sizes[s.group] += 1
            admitted = []
            while self._waiting and len(self._running) < self.max_batch_size:
                cost = len(self._waiting[0].prompt) + self._waiting[0].max_tokens
                if cost > budget and self._running:
                    break
                seq = self._waiting.popleft()
                budget -= cost
                seq.group = sizes.index(min(sizes))
                sizes[seq.group] += 1
                admitted.append(seq)
                self._running.append(seq)
            return admitted, aborted

    def _prefill(self, seq: _Seq) -> int:
        x = torch.tensor([seq.prompt], device=self.lm.device)
        for runner in self.runners:
            x = runner.prefill(seq.id, x)
        return self._sample(_resolved(x), [seq])[0]

    def _decode(self, seqs: list[_Seq], group: int) -> Any:
        """Launch one decode of the group through the runners: logits, or (remote stages) their future answer."""
        ids, lengths = [s.id for s in seqs], [s.length for s in seqs]
        x = torch.tensor([[s.out[-1]] for s in seqs], device=self.lm.device)
        for runner in self.runners:
            x = runner.decode(ids, x, lengths, group)
        return x

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        tokens = []
        for row, s in zip(logits.float(), seqs):
            p = s.params
            if p.temperature == 0:
                tokens.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / p.temperature, dim=-1).cpu()
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            tokens.append(int(torch.multinomial(probs, 1, generator=s.generator)))
        return tokens

    def _emit(self, s: _Seq, token: int) -> StepOutput:
        s.out.append(token)
        reason = "stop" if token in self.lm.eos_ids else None
        if reason is None and len(s.out) >= s.max_tokens:
            reason = "length"
        s.text += self._detokenize(s, final=reason is not None)
        text = s.text
        cut = _find_stop(text, s.params.stop, s.emitted)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None:
            # Hold back a tail that may begin a stop string.
            safe = max(s.emitted, len(text) - max((len(x) - 1 for x in s.params.stop), default=0))
        else:
            safe, s.finish = len(text), reason
        delta, s.emitted = text[s.emitted : safe], max(s.emitted, safe)
        return StepOutput(s.id, delta, token, reason, len(s.prompt), len(s.out))

    def _detokenize(self, s: _Seq, final: bool) -> str:
        """New text for the tokens since the last call; empty while they end inside a UTF-8 character.

        Decodes only a short window (as text-generation-inference does), not the whole output each
        step; special tokens (EOS among them) are not text.
        """
        before = self.lm.decode(s.out[s.prefix_offset : s.read_offset])
        after = self.lm.decode(s.out[s.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            s.prefix_offset, s.read_offset = s.read_offset, len(s.out)
            return after[len(before) :]
        return ""


def _resolved(x):
    """A remote stage's answer (anything with .result(), e.g. a DeploymentResponse) as a tensor."""
    return x if isinstance(x, torch.Tensor) else x.result()


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    start = max(0, emitted - max((len(x) for x in stops), default=0))
    hits = [i for i in (text.find(x, start) for x in stops) if i >= 0]
    return min(hits) if hits else None


def _weights(lm: CausalLM) -> torch.nn.Module:
    if lm.model is None:
        raise ValueError("the engine needs a model with weights, or runners (pipeline stages) that hold them")
    return lm.model
