"""The MPC evaluator: the data owner's side of private forward-only tuning (SecFwT, arXiv 2506.15307, Sec. 3).

It implements :class:`~secfwt.tuning.objective.Evaluator` on top of
:class:`~secfwt.serve.session.PrivateModelClient`: each batch of examples is rendered with the task template,
tokenised and registered with the servers once (as secret shares), and every CMA-ES population is sent as
shared soft prompts in one ``forward`` command; the servers return shares of the (P, B, L) label logits,
which only the data owner reconstructs. It renders templates exactly as
:class:`~secfwt.tuning.objective.HFPlainEvaluator` does, so the plaintext evaluator is its oracle.
"""

from __future__ import annotations

from typing import Any

import torch

from secfwt.cost import CostTracker
from secfwt.errors import ConfigError
from secfwt.nn.config import AttentionConfig
from secfwt.serve.session import HeadSpec, PrivateModelClient
from secfwt.tuning.data import Example
from secfwt.tuning.encode import Encoded, encode_examples, initial_prompt, label_word_id
from secfwt.tuning.objective import Batch, EvalCost, Registrations
from secfwt.tuning.tasks import TaskSpec


class MpcEvaluator:
    """Label logits computed by the two servers under MPC; see the module docstring."""

    mode = "mpc"

    def __init__(
        self,
        client: PrivateModelClient,
        tokenizer: Any,
        task: TaskSpec,
        *,
        head: str,
        attention: AttentionConfig,
        model_name: str,
        embedding_std: float,
        max_length: int = 128,
        max_rows: int = 64,
        temperature: float = 20.0,
        word_table: torch.Tensor | None = None,
    ) -> None:
        if head not in ("mlm", "similarity"):
            raise ConfigError(f"head must be 'mlm' or 'similarity', got {head!r}")
        self.client = client
        self.tokenizer = tokenizer
        self.task = task
        self.head = head
        self.attention = str(attention.attention_kind.value)
        self.model_name = model_name
        self.hidden_size = client.hidden
        self.embedding_std = embedding_std
        self.max_length = max_length
        self.word_table = word_table
        self.template = task.template if head == "mlm" else task.similarity_template
        self._cache: Registrations[tuple[Encoded, torch.Tensor]] = Registrations(client.release)
        self._calls = 0
        if head == "mlm":
            spec = HeadSpec("mlm", [[label_word_id(tokenizer, task.name, w)] for w in task.words])
            client.setup(attention, spec, max_rows=max_rows)
        else:
            descs = [Example((d,), 0) for d in task.label_descriptions]
            enc = encode_examples(tokenizer, "{text}", descs, max_length, 0)
            client.setup(attention, HeadSpec("similarity", scale=temperature), max_rows=max_rows,
                         label_inputs=(enc.input_ids, enc.attention_mask))

    def encode(self, batch: Batch, n_prompt: int) -> tuple[int, Encoded, torch.Tensor]:
        """Register ``batch`` once, its rows sorted by token length (the servers trim padding per chunk).

        Returns the servers' batch number (a counter), the encoding (sorted) and ``order``: sorted row i is
        example ``order[i]``.
        """

        def register() -> tuple[int, tuple[Encoded, torch.Tensor]]:
            enc = encode_examples(self.tokenizer, self.template, batch.examples, self.max_length, n_prompt)
            order = torch.argsort(enc.attention_mask.sum(1), stable=True)
            enc = Encoded(enc.input_ids[order], enc.attention_mask[order], enc.mask_pos[order])
            number = self.client.register(enc.input_ids, enc.attention_mask,
                                          enc.mask_pos if self.head == "mlm" else None)
            return number, (enc, order)

        number, (enc, order) = self._cache.get(batch.cache_key(n_prompt), register, batch.whole_run)
        return number, enc, order

    def logits(self, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Label logits ``(P, B, n_labels)`` for ``prompts`` ``(P, n_prompt, hidden)``."""
        if prompts.dim() != 3 or (prompts.shape[1] and prompts.shape[2] != self.hidden_size):
            raise ConfigError(f"prompts: expected (P, n_prompt, {self.hidden_size}), got {tuple(prompts.shape)}")
        key, _, order = self.encode(batch, int(prompts.shape[1]))
        self._calls += 1
        out = self.client.forward(key, prompts.to(torch.float64)).float()  # (P, B, L) in sorted row order
        unsorted = torch.empty_like(out)
        unsorted[:, order] = out
        return unsorted

    def init_prompt(self, n_prompt: int, seed: int, text: str | None = None) -> torch.Tensor | None:
        """``p0`` from the disclosed word table (random words or ``text``), else None."""
        if self.word_table is None:
            return None
        return initial_prompt(self.word_table, self.tokenizer, n_prompt, seed, text)

    def server_costs(self) -> dict[int, CostTracker]:
        return self.client.server_costs()

    def cost(self) -> EvalCost:
        costs = self.server_costs()
        totals = [c.total() for c in costs.values()]
        return EvalCost(
            bytes_per_server=max(t.bytes_sent for t in totals),
            rounds=max(t.rounds for t in totals),
            compute_s=max(sum(v.time_s for k, v in c.ops.items() if "/" not in k) for c in costs.values()),
            forward_calls=self._calls,
        )

    @property
    def forward_calls(self) -> int:
        return self._calls
