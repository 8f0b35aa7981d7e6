"""The data owner's tuned-prompt file: the soft prompt plus what is needed to use it again.

``secfwt tune --save-prompt PATH`` writes it; ``secfwt predict --prompt PATH`` reads it. It is a safetensors
file with one tensor, ``prompt`` (n_prompt, hidden) float32 — (0, hidden) when the zero-shot floor was kept —
and string metadata: the format tag, the task (built-in name or task-file path), the model directory, and the
model settings the prompt was tuned with (head, attention, embedding, max_length, temperature, frac_bits).
The prompt is the data owner's secret (it encodes what was learned from its data): it never leaves the owner;
in MPC inference it is secret-shared per forward exactly as during tuning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secfwt.errors import ConfigError
from secfwt.files import private_output

FORMAT = "secfwt-prompt/1"
_SETTINGS = ("head", "attention", "embedding", "max_length", "temperature", "frac_bits")


@dataclass
class PromptFile:
    """A tuned prompt and its provenance. ``settings`` holds the :data:`_SETTINGS` fields of the run."""

    prompt: torch.Tensor  # (n_prompt, hidden); n_prompt = 0 means the template alone
    task: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # accuracies, seeds: shown to the user, not used

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if self.prompt.dim() != 2:
            raise ConfigError(f"{path}: prompt must be (n_prompt, hidden), got shape {tuple(self.prompt.shape)}")
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "task": self.task, "model": self.model,
                "settings": json.dumps({k: self.settings[k] for k in _SETTINGS if k in self.settings}),
                "info": json.dumps(self.info)}
        with private_output(path) as tmp:  # mode 0600, atomic
            save_file({"prompt": self.prompt.detach().float().contiguous()}, str(tmp), metadata=meta)
        return path

    @staticmethod
    def load(path: str | Path) -> PromptFile:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: prompt file not found")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != FORMAT:
                    raise ConfigError(f"{path}: format: expected {FORMAT!r}, got {meta.get('format')!r}")
                if keys != {"prompt"}:
                    raise ConfigError(f"{path}: tensors: expected ['prompt'], got {sorted(keys)}")
                prompt = f.get_tensor("prompt")
        except SafetensorError as e:
            raise ConfigError(f"{path}: not a safetensors prompt file ({e})") from e
        if prompt.dim() != 2:
            raise ConfigError(f"{path}: prompt: expected 2 dims (n_prompt, hidden), got {tuple(prompt.shape)}")
        for key in ("task", "model", "settings"):
            if key not in meta:
                raise ConfigError(f"{path}: metadata: missing {key!r}")
        try:
            settings, info = json.loads(meta["settings"]), json.loads(meta.get("info", "{}"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: metadata 'settings' is not JSON ({e})") from e
        return PromptFile(prompt.float(), meta["task"], meta["model"], settings, info)


__all__ = ["FORMAT", "PromptFile"]
