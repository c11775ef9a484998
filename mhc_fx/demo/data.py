"""A character-level corpus every Python install has: the standard library's own source."""

from __future__ import annotations

import pathlib
import sysconfig

import torch

VOCAB = 128  # ASCII; other bytes map to '?'


def stdlib_text(max_chars: int = 2_000_000) -> str:
    """Concatenated ``.py`` files of the standard library (sorted, so always the same text)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str) -> torch.Tensor:
    """ASCII codes ``[len(text)]`` (int64)."""
    return torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.long)


class CharBatches:
    """Random windows of a token sequence: ``batch(b, t)`` → ``(inputs [b, t], targets [b, t])``."""

    def __init__(self, tokens: torch.Tensor, seed: int = 0) -> None:
        self.tokens = tokens
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(self.tokens) - seq - 1, (batch,), generator=self.generator)
        idx = start[:, None] + torch.arange(seq + 1)
        window = self.tokens[idx]
        return window[:, :-1], window[:, 1:]
